"""HTTP side of clemproxy: app factory, OpenAI wire types, routes, streaming, settings, CLI, model manager."""
