"""The admin page's templates, its response headers and cookies, and the CSRF token its forms carry."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import jinja2
from jinja2_fragments import render_block
from litestar import MediaType, Request, Response
from litestar.datastructures import Cookie

from admin.editor import FIELDS, EntryForm
from admin.views import model_row
from backends import ModelRegistry
from backends.registry.file import RegistryFile
from proxy.admin_api import NO_FILE
from proxy.manager import ModelManager
from proxy.security import CSRF_COOKIE, AccessControl
from proxy.upstream import UpstreamClients

HERE = Path(__file__).parent
TEMPLATE = "admin.html.j2"
LOGIN_TEMPLATE = "login.html.j2"

ENVIRONMENT = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True
)


def html(content: str, status_code: int = 200, cookies: list[Cookie] | None = None) -> Response[str]:
    # The page is never framed by another site (clickjacking) and never sends its URL elsewhere.
    headers = {"x-frame-options": "DENY", "referrer-policy": "same-origin", "cache-control": "no-store"}
    return Response(
        content=content, media_type=MediaType.HTML, status_code=status_code, headers=headers, cookies=cookies
    )


def cookie(request: Request[Any, Any, Any], key: str, value: str, max_age: int | None = None) -> Cookie:
    """HTTP-only, same-site, and secure when the page came over HTTPS (behind a TLS proxy)."""
    return Cookie(
        key=key,
        value=value,
        path="/",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        max_age=max_age,
    )


def csrf_token(request: Request[Any, Any, Any], access: AccessControl) -> tuple[str, list[Cookie]]:
    """The CSRF token for the page's forms, and the cookie to set with it when the browser has none yet."""
    value = request.cookies.get(CSRF_COOKIE)
    if value:
        return access.csrf_token(value), []
    value = secrets.token_urlsafe(24)
    return access.csrf_token(value), [cookie(request, CSRF_COOKIE, value)]


EDITOR_TEMPLATE = "editor.html.j2"


def editing(registry_file: RegistryFile | None) -> dict[str, Any]:
    """What the page needs to offer editing: the file's path when it can be edited, else why not."""
    refusal = registry_file.refusal() if registry_file is not None else NO_FILE
    path = str(registry_file.path) if registry_file is not None and refusal is None else None
    return {"registry_path": path, "refusal": refusal}


def render_editor(token: str, registry_file: RegistryFile | None, form: EntryForm | None) -> str:
    return render_block(
        ENVIRONMENT, EDITOR_TEMPLATE, "editor", form=form, fields=FIELDS, csrf_token=token, **editing(registry_file)
    )


def render_row(
    request: Request[Any, Any, Any],
    registry: ModelRegistry,
    manager: ModelManager,
    access: AccessControl,
    upstreams: UpstreamClients,
    registry_file: RegistryFile | None,
    name: str,
    action_error: str | None = None,
) -> str:
    token, _ = csrf_token(request, access)
    return render_block(
        ENVIRONMENT,
        TEMPLATE,
        "row",
        model=model_row(registry, manager, upstreams, name),
        action_error=action_error,
        csrf_token=token,
        **editing(registry_file),
    )
