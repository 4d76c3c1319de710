"""The admin page: every registry entry, its state and GPU offload, with load and unload.

Rendered with jinja2; an htmx request gets only the block that changed (jinja2-fragments). Works without
JavaScript too: full pages, form POSTs and redirects. It plugs itself into the app (``AdminPlugin``,
registered as a ``clemproxy.plugins`` entry point), since it builds on ``proxy`` and not the other way round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from jinja2_fragments import render_block
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.config.app import AppConfig
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery
from litestar.plugins import InitPluginProtocol
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

from admin.views import model_row, page_context, summary_context
from backends import ModelRegistry
from proxy.errors import APIError
from proxy.manager import ModelManager

HERE = Path(__file__).parent
TEMPLATE = "admin.html.j2"


def template_environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True
    )


ENVIRONMENT = template_environment()


def html(content: str) -> Response[str]:
    return Response(content=content, media_type=MediaType.HTML)


def render_row(registry: ModelRegistry, manager: ModelManager, name: str, action_error: str | None = None) -> str:
    return render_block(
        ENVIRONMENT, TEMPLATE, "row", model=model_row(registry, manager, name), action_error=action_error
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

    @get("/")
    async def page(
        self,
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        q: FromQuery[str] = "",
    ) -> Response[str]:
        context = page_context(registry, manager, q.strip())
        return html(ENVIRONMENT.get_template(TEMPLATE).render(**context))

    @get("/summary")
    async def summary(
        self, registry: NamedDependency[ModelRegistry], manager: NamedDependency[ModelManager]
    ) -> Response[str]:
        return html(render_block(ENVIRONMENT, TEMPLATE, "summary", summary=summary_context(registry, manager)))

    @get("/rows/{name:str}")
    async def row(
        self, registry: NamedDependency[ModelRegistry], manager: NamedDependency[ModelManager], name: FromPath[str]
    ) -> Response[str]:
        return html(render_row(registry, manager, name))

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
            return html(render_row(registry, manager, name, error))
        return Redirect(path=f"/admin/?q={quote(name)}" if error else "/admin/", status_code=303)


class AdminPlugin(InitPluginProtocol):
    """Adds the admin page and its static files to the app."""

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.append(AdminController)
        app_config.route_handlers.append(
            create_static_files_router(path="/admin/static", directories=[HERE / "static"], include_in_schema=False)
        )
        return app_config
