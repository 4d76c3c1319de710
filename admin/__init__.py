"""The admin page: every registry entry, its state and GPU offload, with load and unload.

Rendered with jinja2; an htmx request gets only the block that changed (jinja2-fragments). Works without
JavaScript too: full pages, form POSTs and redirects. It plugs itself into the app (``AdminPlugin``,
registered as a ``clemproxy.plugins`` entry point), since it builds on ``proxy`` and not the other way round.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from jinja2_fragments import render_block
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.config.app import AppConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath, FromQuery
from litestar.plugins import InitPluginProtocol
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

from admin.views import model_row, page_context, summary_context
from backends import ModelRegistry
from proxy.errors import APIError
from proxy.manager import ModelManager
from proxy.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_PATH,
    SAFE_METHODS,
    SESSION_COOKIE,
    SESSION_SECONDS,
    AccessControl,
    auth_of,
)

HERE = Path(__file__).parent
TEMPLATE = "admin.html.j2"


def template_environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True
    )


ENVIRONMENT = template_environment()


def html(content: str, status_code: int = 200, cookies: list[Cookie] | None = None) -> Response[str]:
    # The page is never framed by another site (clickjacking) and never sends its URL elsewhere.
    headers = {"x-frame-options": "DENY", "referrer-policy": "same-origin", "cache-control": "no-store"}
    return Response(
        content=content, media_type=MediaType.HTML, status_code=status_code, headers=headers, cookies=cookies
    )


def access_of(connection: ASGIConnection[Any, Any, Any, Any]) -> AccessControl:
    access: AccessControl = connection.app.state.access
    return access


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


def csrf_token(request: Request[Any, Any, Any]) -> tuple[str, list[Cookie]]:
    """The CSRF token for the page's forms, and the cookie to set with it when the browser has none yet."""
    value = request.cookies.get(CSRF_COOKIE)
    if value:
        return access_of(request).csrf_token(value), []
    value = secrets.token_urlsafe(24)
    return access_of(request).csrf_token(value), [cookie(request, CSRF_COOKIE, value)]


async def require_csrf_token(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Every state-changing admin request carries the page's CSRF token (form field, or the header htmx sends),
    unless it authenticated with a bearer key, which a browser never adds on its own."""
    if connection.scope.get("method") in SAFE_METHODS or auth_of(connection) == "bearer":
        return
    token = connection.headers.get(CSRF_HEADER)
    if token is None:
        form = await Request[Any, Any, Any](connection.scope, connection.receive).form()  # kept for the handler
        field = form.get(CSRF_FIELD)
        token = field if isinstance(field, str) else None
    if not access_of(connection).csrf_ok(connection.cookies.get(CSRF_COOKIE), token):
        raise APIError(
            403,
            "The form's CSRF token is missing or out of date; reload the admin page and try again",
            code="csrf_token_invalid",
            headers={"HX-Refresh": "true"},  # htmx reloads the page, which brings a fresh token
        )


def render_row(
    request: Request[Any, Any, Any],
    registry: ModelRegistry,
    manager: ModelManager,
    name: str,
    action_error: str | None = None,
) -> str:
    token, _ = csrf_token(request)
    return render_block(
        ENVIRONMENT,
        TEMPLATE,
        "row",
        model=model_row(registry, manager, name),
        action_error=action_error,
        csrf_token=token,
    )


def placement_override(form: Any) -> dict[str, Any]:
    """The Load form's placement choice as registry keys; the entry's own placement when left as it is."""
    choice = form.get("placement", "entry")
    if choice == "cpu":
        return {"execute_on": "cpu"}
    if choice == "gpu":
        return {"execute_on": "gpu"}
    if choice == "layers":
        try:
            return {"gpu_layers_offloaded": int(form.get("layers", "0"))}
        except ValueError:
            raise APIError(400, "The number of layers must be a whole number", param="layers") from None
    return {}


def in_background(request: Request[Any, Any, Any], work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run a load or unload that outlives the request that asked for it (the row polls for its outcome)."""
    task = asyncio.create_task(work)
    tasks: set[asyncio.Task[Any]] = request.app.state.setdefault("admin_tasks", set())
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    # Its failure is recorded in the model's state; retrieving it here keeps asyncio from reporting it again.
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task


class AdminController(Controller):
    path = "/admin"
    include_in_schema = False
    guards = (require_csrf_token,)

    @get("/")
    async def page(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        q: FromQuery[str] = "",
    ) -> Response[str]:
        context = page_context(registry, manager, q.strip())
        token, cookies = csrf_token(request)
        signed_in = auth_of(request) == "session"
        page = ENVIRONMENT.get_template(TEMPLATE).render(**context, csrf_token=token, signed_in=signed_in)
        return html(page, cookies=cookies)

    @get("/summary")
    async def summary(
        self, registry: NamedDependency[ModelRegistry], manager: NamedDependency[ModelManager]
    ) -> Response[str]:
        return html(render_block(ENVIRONMENT, TEMPLATE, "summary", summary=summary_context(registry, manager)))

    @get("/rows/{name:str}")
    async def row(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        name: FromPath[str],
    ) -> Response[str]:
        return html(render_row(request, registry, manager, name))

    @post("/models/{name:str}/load", status_code=200)
    async def load(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        name: FromPath[str],
    ) -> Response[str] | Redirect:
        registry.lookup(name)  # 404 for an unknown name
        try:
            override = placement_override(await request.form())
        except APIError as exc:
            return await self._answer(request, registry, manager, name, exc.message)
        return await self._run(request, registry, manager, name, manager.load(name, override))

    @post("/models/{name:str}/unload", status_code=200)
    async def unload(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        name: FromPath[str],
    ) -> Response[str] | Redirect:
        registry.lookup(name)
        return await self._run(request, registry, manager, name, manager.unload(name))

    async def _run(
        self,
        request: Request[Any, Any, Any],
        registry: ModelRegistry,
        manager: ModelManager,
        name: str,
        work: Coroutine[Any, Any, Any],
    ) -> Response[str] | Redirect:
        """Start a load or unload; with htmx answer with the row at once (it polls for the outcome), without
        JavaScript once the work is over. Refusals that change no state (409, a bad choice) show in the row;
        a failed load shows as the model's state."""
        task = in_background(request, work)
        await asyncio.wait({task}, timeout=0.05 if request.headers.get("hx-request") else None)
        failure = task.exception() if task.done() else None
        error = failure.message if isinstance(failure, APIError) and failure.status < 500 else None
        return await self._answer(request, registry, manager, name, error)

    async def _answer(
        self,
        request: Request[Any, Any, Any],
        registry: ModelRegistry,
        manager: ModelManager,
        name: str,
        error: str | None,
    ) -> Response[str] | Redirect:
        if request.headers.get("hx-request"):
            return html(render_row(request, registry, manager, name, error))
        return Redirect(path=f"/admin/?q={quote(name)}" if error else "/admin/", status_code=303)


def safe_next(target: str) -> str:
    """Where to go after signing in: a page of this admin only, never another site (``//evil.example``)."""
    return target if target.startswith("/admin") and "//" not in target and "\\" not in target else "/admin/"


class LoginController(Controller):
    """The admin page's sign-in: the admin key, typed once, becomes an HTTP-only session cookie."""

    path = LOGIN_PATH
    include_in_schema = False
    guards = (require_csrf_token,)

    @get("/")
    async def form(self, request: Request[Any, Any, Any], next: FromQuery[str] = "/admin/") -> Response[str] | Redirect:
        if access_of(request).admin_open:
            return Redirect(path="/admin/", status_code=303)
        return self._page(request, safe_next(next))

    @post("/", status_code=303)
    async def sign_in(self, request: Request[Any, Any, Any]) -> Response[str] | Redirect:
        form = await request.form()
        access = access_of(request)
        key, target = form.get("key"), safe_next(str(form.get("next") or "/admin/"))
        if not isinstance(key, str) or access.admin_open or not access.admin_key_ok(key):
            await asyncio.sleep(0.5)  # slows down guessing
            return self._page(request, target, "That is not the admin key.", status_code=401)
        session = cookie(request, SESSION_COOKIE, access.start_session(), max_age=SESSION_SECONDS)
        return Redirect(path=target, status_code=303, cookies=[session])

    @post("/logout", status_code=303)
    async def sign_out(self, request: Request[Any, Any, Any]) -> Redirect:
        access_of(request).end_session(request.cookies.get(SESSION_COOKIE))
        return Redirect(path=LOGIN_PATH, status_code=303, cookies=[cookie(request, SESSION_COOKIE, "", max_age=0)])

    def _page(
        self, request: Request[Any, Any, Any], target: str, error: str | None = None, status_code: int = 200
    ) -> Response[str]:
        token, cookies = csrf_token(request)
        context = {"csrf_token": token, "next": target, "error": error, "kind": access_of(request).admin_key_kind}
        return html(ENVIRONMENT.get_template("login.html.j2").render(**context), status_code, cookies)


class AdminPlugin(InitPluginProtocol):
    """Adds the admin page, its sign-in and its static files to the app."""

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.append(AdminController)
        app_config.route_handlers.append(LoginController)
        app_config.route_handlers.append(
            create_static_files_router(path="/admin/static", directories=[HERE / "static"], include_in_schema=False)
        )
        return app_config
