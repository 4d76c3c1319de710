"""The Litestar application factory."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.plugins import InitPluginProtocol

from backends import LoadOptions, ModelRegistry, create_model
from proxy.access_log import access_log_middleware
from proxy.admin_api import AdminAPIController
from proxy.errors import EXCEPTION_HANDLERS
from proxy.limits import RequestLimits
from proxy.manager import ManagerSettings, ModelFactory, ModelManager
from proxy.metrics import Metrics, MetricsController
from proxy.routes import DEPENDENCIES, HealthController, OpenAIController
from proxy.security import AccessControl, access_control_middleware
from proxy.settings import Settings

logger = logging.getLogger(__name__)


def manager_settings(settings: Settings) -> ManagerSettings:
    return ManagerSettings(
        autoload=settings.autoload,
        max_queue=settings.max_queue,
        idle_unload=settings.idle_unload,
        max_loaded=settings.max_loaded,
        max_memory=settings.max_memory,
        unload_timeout=settings.unload_timeout,
        request_timeout=settings.request_timeout,
    )


def access_control(settings: Settings) -> AccessControl:
    return AccessControl(
        api_keys=settings.api_keys,
        admin_keys=settings.admin_keys,
        bind_host=settings.host,
        allowed_hosts=settings.allowed_hosts,
        cors_origins=settings.cors_origins,
    )


PLUGIN_GROUP = "clemproxy.plugins"


def installed_plugins() -> list[InitPluginProtocol]:
    """Plugins other packages register under the ``clemproxy.plugins`` entry point, like the admin page.

    The admin page builds on this layer (admin -> proxy), so it plugs itself in rather than being imported here.
    """
    plugins = []
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        plugins.append(entry_point.load()())
        logger.debug("plugin %s from %s", entry_point.name, entry_point.value)
    return plugins


def create_app(
    settings: Settings,
    *,
    registry: ModelRegistry | None = None,
    model_factory: ModelFactory | None = None,
    plugins: Sequence[InitPluginProtocol] | None = None,
) -> Litestar:
    """Build the app. The registry is read here, so that a missing or unreadable file fails before serving."""
    registry = registry if registry is not None else ModelRegistry.from_sources(settings.registries)
    for entry in registry:
        if entry.errors:
            logger.warning(
                "registry entry %s (%s #%d) is invalid and will be refused: %s",
                entry.name,
                entry.source,
                entry.index,
                "; ".join(str(p) for p in entry.errors),
            )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        options = LoadOptions(context_size=settings.context_size)
        manager = ModelManager(
            registry, options, model_factory or create_model, manager_settings(settings), metrics=app.state.metrics
        )
        app.state.manager = manager
        for name in settings.preload:
            logger.info("preloading %s", name)
            await manager.load(name)  # a model that cannot load stops the start-up, with its error
        idle_unloader = asyncio.create_task(manager.run_idle_unloader()) if settings.idle_unload else None
        try:
            yield
        finally:
            if idle_unloader is not None:
                idle_unloader.cancel()
            await manager.close()

    app = Litestar(
        route_handlers=[OpenAIController, HealthController, AdminAPIController, MetricsController],
        dependencies=DEPENDENCIES,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        state=State(
            {
                "settings": settings,
                "registry": registry,
                "started_at": time.time(),
                "access": access_control(settings),
                "limits": RequestLimits.from_settings(settings),
            }
        ),
        openapi_config=None,
        logging_config=None,  # the CLI configures logging (one redacting handler); Litestar would replace it
        middleware=[access_log_middleware, access_control_middleware],
        request_max_body_size=settings.max_body_size,
        plugins=list(installed_plugins() if plugins is None else plugins),
    )
    app.state.metrics = Metrics(app.state)
    return app
