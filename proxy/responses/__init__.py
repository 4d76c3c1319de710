"""The Responses API (``/v1/responses``): its wire types, its serving on the shared path, its routes, and the
store of responses that conversations continue from."""
