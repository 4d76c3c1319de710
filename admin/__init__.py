"""The admin page: every registry entry, its state and GPU offload, with load and unload.

Rendered with jinja2; an htmx request gets only the block that changed (jinja2-fragments). Works without
JavaScript too: full pages, form POSTs and redirects. It plugs itself into the app (``AdminPlugin``,
registered as a ``clemproxy.plugins`` entry point), since it builds on ``proxy`` and not the other way round.

- ``plugin``: what the page adds to the app;
- ``controllers``: the page, its fragments and actions, and the sign-in;
- ``rendering``: templates, cookies and the CSRF token the forms carry;
- ``views``: what the page shows, built from the registry and the model manager.
"""

from __future__ import annotations

from admin.plugin import AdminPlugin

__all__ = ["AdminPlugin"]
