"""The admin page's routes: the page and its fragments, Load and Unload, and the sign-in.

Who may reach them is declared here (``opt``) and enforced by the app's guard (``proxy.security``): the page
needs the admin key or a session, and every form POST the page's CSRF token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

from jinja2_fragments import render_block
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect

from admin.editor import EntryForm
from admin.rendering import (
    ENVIRONMENT,
    LOGIN_TEMPLATE,
    TEMPLATE,
    cookie,
    csrf_token,
    editing,
    html,
    render_editor,
    render_row,
)
from admin.views import conversions_context, page_context, summary_context
from backends import BackendError, ModelRegistry, RegistryFileError
from backends.registry.file import RegistryEditError, RegistryFile, entry_name
from backends.weights.convert_cache import ConvertCache
from proxy.admin_api import NO_FILE, apply_edit, clear_conversion, freshen, split_action
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
        registry_file: NamedDependency[RegistryFile | None],
        convert_cache: NamedDependency[ConvertCache | None],
        q: FromQuery[str] = "",
    ) -> Response[str]:
        await freshen(registry, manager, upstreams)
        context = page_context(registry, manager, upstreams, q.strip())
        conversions = await asyncio.to_thread(conversions_context, convert_cache)
        token, cookies = csrf_token(request, access)
        signed_in = auth_of(request) == "session"
        page = ENVIRONMENT.get_template(TEMPLATE).render(
            **context, **editing(registry_file), conversions=conversions, csrf_token=token, signed_in=signed_in
        )
        return html(page, cookies=cookies)

    @post("/convert-cache/{key:str}/clear", status_code=200)
    async def clear_conversion(
        self,
        request: Request[Any, Any, Any],
        access: NamedDependency[AccessControl],
        convert_cache: NamedDependency[ConvertCache | None],
        key: FromPath[str],
    ) -> Response[str] | Redirect:
        """A Clear button of the conversions' section: that section again with htmx, else the page."""
        error = None
        try:
            await asyncio.to_thread(clear_conversion, convert_cache, key)
        except APIError as exc:
            error = exc.message
        if not request.headers.get("hx-request"):
            return Redirect(path="/admin/", status_code=303)
        conversions = await asyncio.to_thread(conversions_context, convert_cache, error)
        token, cookies = csrf_token(request, access)
        section = render_block(ENVIRONMENT, TEMPLATE, "conversions", conversions=conversions, csrf_token=token)
        return html(section, cookies=cookies)

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
        registry_file: NamedDependency[RegistryFile | None],
        name: FromPath[str],
    ) -> Response[str]:
        await freshen(registry, manager, upstreams)
        return html(render_row(request, registry, manager, access, upstreams, registry_file, name.lstrip("/")))

    @post("/models/{action:path}", status_code=200)
    async def model_action(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        access: NamedDependency[AccessControl],
        upstreams: NamedDependency[UpstreamClients],
        registry_file: NamedDependency[RegistryFile | None],
        admin_tasks: NamedDependency[Tasks],
        action: FromPath[str],
    ) -> Response[str] | Redirect:
        """The Load (``/admin/models/NAME/load``) and Unload buttons; NAME may hold slashes."""
        name, verb = split_action(action)
        registry.lookup(name)  # 404 for an unknown name
        if manager.slot(name).remote:  # nothing to load: the row says so
            return self._answer(request, registry, manager, access, upstreams, registry_file, name, None)
        if verb == "unload":
            work = manager.unload(name)
        else:
            try:
                override = placement_override(await request.form())
            except APIError as exc:
                return self._answer(request, registry, manager, access, upstreams, registry_file, name, exc.message)
            work = manager.load(name, override)
        task = in_background(admin_tasks, work)
        return await self._when_started(request, registry, manager, access, upstreams, registry_file, name, task)

    # --- the registry editor --------------------------------------------------------------------------

    @get("/registry/form")
    async def entry_form(
        self,
        request: Request[Any, Any, Any],
        access: NamedDependency[AccessControl],
        registry_file: NamedDependency[RegistryFile | None],
        name: FromQuery[str] = "",
        duplicate: FromQuery[bool] = False,
        close: FromQuery[bool] = False,
    ) -> Response[str]:
        """The form for a new entry, an entry of the file (``name``), or a copy of one (``duplicate``)."""
        token, _ = csrf_token(request, access)
        if close or registry_file is None or registry_file.refusal() is not None:
            return html(render_editor(token, registry_file, None))
        entries, version, _ = registry_file.read()
        if not name:
            return html(render_editor(token, registry_file, EntryForm({"backend": "llamacpp"}, "", "", version)))
        entry = next((e for e in entries if entry_name(e) == name), None)
        if entry is None:
            raise APIError(404, f"{registry_file.path} has no entry named '{name}'", code="model_not_found")
        form = EntryForm.of_entry(entry, "" if duplicate else name, version)
        if duplicate:
            form.values["model_name"] = f"{name}-copy"
        return html(render_editor(token, registry_file, form))

    @post("/registry/save", status_code=200)
    async def save_entry(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        access: NamedDependency[AccessControl],
        registry_file: NamedDependency[RegistryFile | None],
    ) -> Response[str] | Redirect:
        """Save the form's entry (a renamed one replaces its old name); errors go back next to their fields."""
        form = EntryForm.of_form(await request.form())
        entry = form.entry()
        if entry is not None:
            error = await self._edit(registry, manager, registry_file, form, lambda file: save(file, form, entry))
            if error is None:
                return self._reload(request)
        token, _ = csrf_token(request, access)
        status = 200 if request.headers.get("hx-request") else 400  # htmx swaps only what succeeds
        return html(render_editor(token, registry_file, form), status_code=status)

    @post("/registry/delete/{name:path}", status_code=200)
    async def delete_entry(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        registry_file: NamedDependency[RegistryFile | None],
        name: FromPath[str],
    ) -> Response[str] | Redirect:
        form = EntryForm({}, "")
        name = name.lstrip("/")
        await self._edit(registry, manager, registry_file, form, lambda file: file.delete(name, None))
        if form.errors:
            raise APIError(409, " ".join(form.errors["form"]), code="registry_conflict")
        return self._reload(request)

    @staticmethod
    async def _edit(
        registry: ModelRegistry,
        manager: ModelManager,
        registry_file: RegistryFile | None,
        form: EntryForm,
        edit: Callable[[RegistryFile], str],
    ) -> str | None:
        """Make the edit; what went wrong is put on the form (and returned), None when it was saved."""
        if registry_file is None:
            form.errors["form"] = [f"The registry cannot be edited: {NO_FILE}"]
            return form.errors["form"][0]
        try:
            await apply_edit(registry, manager, lambda: edit(registry_file))
        except RegistryEditError as exc:
            form.show(exc.problems)
            if not exc.problems:
                form.errors["form"] = [exc.message]
            return exc.message
        except RegistryFileError as exc:
            form.errors["form"] = [str(exc)]
            return str(exc)
        return None

    @staticmethod
    def _reload(request: Request[Any, Any, Any]) -> Response[str] | Redirect:
        """After a saved edit the whole page is drawn again: rows may have come, gone or changed."""
        if request.headers.get("hx-request"):
            return Response("", headers={"HX-Refresh": "true"}, media_type="text/html")
        return Redirect(path="/admin/", status_code=303)

    async def _when_started(
        self,
        request: Request[Any, Any, Any],
        registry: ModelRegistry,
        manager: ModelManager,
        access: AccessControl,
        upstreams: UpstreamClients,
        registry_file: RegistryFile | None,
        name: str,
        task: asyncio.Task[Any],
    ) -> Response[str] | Redirect:
        """With htmx answer with the row at once (it polls for the outcome), without JavaScript once the work
        is over."""
        await asyncio.wait({task}, timeout=0.05 if request.headers.get("hx-request") else None)
        failure = task.exception() if task.done() else None
        return self._answer(request, registry, manager, access, upstreams, registry_file, name, refusal_of(failure))

    def _answer(
        self,
        request: Request[Any, Any, Any],
        registry: ModelRegistry,
        manager: ModelManager,
        access: AccessControl,
        upstreams: UpstreamClients,
        registry_file: RegistryFile | None,
        name: str,
        error: str | None,
    ) -> Response[str] | Redirect:
        if request.headers.get("hx-request"):
            return html(render_row(request, registry, manager, access, upstreams, registry_file, name, error))
        return Redirect(path=f"/admin/?q={quote(name)}" if error else "/admin/", status_code=303)


def save(file: RegistryFile, form: EntryForm, entry: dict[str, Any]) -> str:
    """Write the form's entry; one saved under a new name takes its old name's place (the old one goes)."""
    version = file.put(form.name, entry, form.version or None)
    if form.original and form.original != form.name:
        version = file.delete(form.original, version)
    return version


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
