"""The admin page's routes: the page and its fragments, Load and Unload, and the sign-in.

Who may reach them is declared here (``opt``) and enforced by the app's guard (``proxy.security``): the page
needs the admin key or a session, and every form POST the page's CSRF token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any
from urllib.parse import quote

from jinja2_fragments import render_block
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect

from admin.rendering import ENVIRONMENT, LOGIN_TEMPLATE, TEMPLATE, cookie, csrf_token, html, render_row
from admin.views import page_context, summary_context
from backends import BackendError, ModelRegistry
from proxy.admin_api import freshen, split_action
from proxy.errors import APIError
from proxy.manager import ManagerError, ModelManager
from proxy.security import LOGIN_PATH, SESSION_COOKIE, SESSION_SECONDS, Access, AccessControl, auth_of, requires
from proxy.upstream import UpstreamClients

Tasks = set[asyncio.Task[Any]]


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


def in_background(tasks: Tasks, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run a load or unload that outlives the request that asked for it (the row polls for its outcome)."""
    task = asyncio.create_task(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    # Its failure is recorded in the model's state; retrieving it here keeps asyncio from reporting it again.
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task


def refusal_of(failure: BaseException | None) -> str | None:
    """A refusal that changed no state (409, a bad choice) is shown in the row; a failed load shows as the
    model's state instead."""
    if isinstance(failure, APIError | ManagerError | BackendError) and failure.status < 500:
        return failure.message
    return None


class AdminController(Controller):
    path = "/admin"
    include_in_schema = False
    opt = requires(Access.ADMIN_PAGE)

    @get("/")
    async def page(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        access: NamedDependency[AccessControl],
        upstreams: NamedDependency[UpstreamClients],
        q: FromQuery[str] = "",
    ) -> Response[str]:
        await freshen(registry, manager, upstreams)
        context = page_context(registry, manager, upstreams, q.strip())
        token, cookies = csrf_token(request, access)
        signed_in = auth_of(request) == "session"
        page = ENVIRONMENT.get_template(TEMPLATE).render(**context, csrf_token=token, signed_in=signed_in)
        return html(page, cookies=cookies)

    @get("/summary")
    async def summary(
        self, registry: NamedDependency[ModelRegistry], manager: NamedDependency[ModelManager]
    ) -> Response[str]:
        return html(render_block(ENVIRONMENT, TEMPLATE, "summary", summary=summary_context(registry, manager)))

    @get("/rows/{name:path}")
    async def row(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        access: NamedDependency[AccessControl],
        upstreams: NamedDependency[UpstreamClients],
        name: FromPath[str],
    ) -> Response[str]:
        await freshen(registry, manager, upstreams)
        return html(render_row(request, registry, manager, access, upstreams, name.lstrip("/")))

    @post("/models/{action:path}", status_code=200)
    async def model_action(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        access: NamedDependency[AccessControl],
        upstreams: NamedDependency[UpstreamClients],
        admin_tasks: NamedDependency[Tasks],
        action: FromPath[str],
    ) -> Response[str] | Redirect:
        """The Load (``/admin/models/NAME/load``) and Unload buttons; NAME may hold slashes."""
        name, verb = split_action(action)
        registry.lookup(name)  # 404 for an unknown name
        if manager.slot(name).remote:  # nothing to load: the row says so
            return self._answer(request, registry, manager, access, upstreams, name, None)
        if verb == "unload":
            work = manager.unload(name)
        else:
            try:
                override = placement_override(await request.form())
            except APIError as exc:
                return self._answer(request, registry, manager, access, upstreams, name, exc.message)
            work = manager.load(name, override)
        task = in_background(admin_tasks, work)
        return await self._when_started(request, registry, manager, access, upstreams, name, task)

    async def _when_started(
        self,
        request: Request[Any, Any, Any],
        registry: ModelRegistry,
        manager: ModelManager,
        access: AccessControl,
        upstreams: UpstreamClients,
        name: str,
        task: asyncio.Task[Any],
    ) -> Response[str] | Redirect:
        """With htmx answer with the row at once (it polls for the outcome), without JavaScript once the work
        is over."""
        await asyncio.wait({task}, timeout=0.05 if request.headers.get("hx-request") else None)
        failure = task.exception() if task.done() else None
        return self._answer(request, registry, manager, access, upstreams, name, refusal_of(failure))

    def _answer(
        self,
        request: Request[Any, Any, Any],
        registry: ModelRegistry,
        manager: ModelManager,
        access: AccessControl,
        upstreams: UpstreamClients,
        name: str,
        error: str | None,
    ) -> Response[str] | Redirect:
        if request.headers.get("hx-request"):
            return html(render_row(request, registry, manager, access, upstreams, name, error))
        return Redirect(path=f"/admin/?q={quote(name)}" if error else "/admin/", status_code=303)


def safe_next(target: str) -> str:
    """Where to go after signing in: a page of this admin only, never another site (``//evil.example``)."""
    return target if target.startswith("/admin") and "//" not in target and "\\" not in target else "/admin/"


class LoginController(Controller):
    """The admin page's sign-in: the admin key, typed once, becomes an HTTP-only session cookie."""

    path = LOGIN_PATH
    include_in_schema = False
    opt = requires(Access.SIGN_IN)

    @get("/")
    async def form(
        self, request: Request[Any, Any, Any], access: NamedDependency[AccessControl], next: FromQuery[str] = "/admin/"
    ) -> Response[str] | Redirect:
        if access.admin_open:
            return Redirect(path="/admin/", status_code=303)
        return self._page(request, access, safe_next(next))

    @post("/", status_code=303)
    async def sign_in(
        self, request: Request[Any, Any, Any], access: NamedDependency[AccessControl]
    ) -> Response[str] | Redirect:
        form = await request.form()
        key, target = form.get("key"), safe_next(str(form.get("next") or "/admin/"))
        if not isinstance(key, str) or access.admin_open or not access.admin_key_ok(key):
            await asyncio.sleep(0.5)  # slows down guessing
            return self._page(request, access, target, "That is not the admin key.", status_code=401)
        session = cookie(request, SESSION_COOKIE, access.start_session(), max_age=SESSION_SECONDS)
        return Redirect(path=target, status_code=303, cookies=[session])

    @post("/logout", status_code=303)
    async def sign_out(self, request: Request[Any, Any, Any], access: NamedDependency[AccessControl]) -> Redirect:
        access.end_session(request.cookies.get(SESSION_COOKIE))
        return Redirect(path=LOGIN_PATH, status_code=303, cookies=[cookie(request, SESSION_COOKIE, "", max_age=0)])

    def _page(
        self,
        request: Request[Any, Any, Any],
        access: AccessControl,
        target: str,
        error: str | None = None,
        status_code: int = 200,
    ) -> Response[str]:
        token, cookies = csrf_token(request, access)
        context = {"csrf_token": token, "next": target, "error": error, "kind": access.admin_key_kind}
        return html(ENVIRONMENT.get_template(LOGIN_TEMPLATE).render(**context), status_code, cookies)
