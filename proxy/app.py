"""The Litestar application factory."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from litestar import Litestar
from litestar.di import Provide
from litestar.plugins import InitPluginProtocol

from backends import ModelRegistry, create_model
from backends.hosts.process import WorkerProcesses
from backends.registry.file import RegistryFile
from backends.weights.convert_cache import ConvertCache
from proxy.access_log import access_log_middleware
from proxy.admin_api import AdminAPIController
from proxy.chat import ChatCompletionService
from proxy.completions import CompletionService
from proxy.errors import EXCEPTION_HANDLERS
from proxy.limits import RequestLimits
from proxy.manager import ModelFactory, ModelManager
from proxy.metrics import Metrics, MetricsController
from proxy.ray_serve import RayCluster
from proxy.responses.routes import ResponsesController
from proxy.responses.serving import ResponsesService
from proxy.responses.store import ResponseStore
from proxy.routes import HealthController, OpenAIController
from proxy.security import AccessControl, SignInRequired, access_middleware, handle_sign_in_required
from proxy.settings import Settings
from proxy.upstream import Forwarder, UpstreamClients, UpstreamErrorResponse, handle_upstream_error

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "clemproxy.plugins"


@dataclass(frozen=True)
class Services:
    """The long-lived objects of one server, built once; route handlers receive them as dependencies."""

    settings: Settings
    registry: ModelRegistry
    manager: ModelManager
    metrics: Metrics
    access: AccessControl
    limits: RequestLimits
    chat_service: ChatCompletionService
    completion_service: CompletionService
    response_store: ResponseStore  # the Responses API's stored responses, opened on first use
    responses_service: ResponsesService
    upstreams: UpstreamClients
    forwarder: Forwarder
    ray: RayCluster | None  # with --ray: the cluster loaded models are deployed on
    registry_file: RegistryFile | None  # where registry edits go: the first registry file the server was given
    convert_cache: ConvertCache | None  # GGUF checkpoints converted for transformers; None: --convert-cache none
    started_at: float

    @classmethod
    def build(
        cls, settings: Settings, registry: ModelRegistry | None = None, model_factory: ModelFactory | None = None
    ) -> Services:
        """The registry and the key files are read here, so that a missing or unreadable one fails before
        serving (the CLI reads the key files first, to report a bad one and to redact the keys in its log)."""
        keys = settings.access.with_key_files_read()
        registry = registry if registry is not None else ModelRegistry.from_sources(settings.server.registry)
        for entry in registry:
            if entry.errors:
                logger.warning(
                    "registry entry %s (%s #%d) is invalid and will be refused: %s",
                    entry.name,
                    entry.source,
                    entry.index,
                    "; ".join(str(p) for p in entry.errors),
                )
        metrics = Metrics()
        ray = RayCluster(settings.cluster.ray, settings.cluster.ray_deploy_timeout) if settings.cluster.ray else None
        workers = (
            WorkerProcesses(
                settings.models.threads, settings.manager.unload_timeout, settings.manager.threads_follow_load
            )
            if settings.manager.worker_processes and ray is None
            else None
        )
        default_factory = ray.model if ray is not None else workers.model if workers is not None else create_model
        manager = ModelManager(
            registry,
            settings.models,
            model_factory or default_factory,
            settings.manager,
            metrics=metrics,
            concurrency=ray.concurrency_of if ray is not None else None,
        )
        metrics.watch(manager)
        limits = RequestLimits(settings.limits)
        upstreams = UpstreamClients(settings.cluster)
        storage = settings.storage
        store = ResponseStore(storage.database_dir(), storage.responses_max_age, storage.responses_max_count)
        return cls(
            settings=settings,
            registry=registry,
            manager=manager,
            metrics=metrics,
            access=AccessControl(
                api_keys=keys.api_key,
                admin_keys=keys.admin_key,
                bind_host=settings.server.host,
                allowed_hosts=settings.access.allowed_host,
                cors_origins=settings.access.cors_origin,
            ),
            limits=limits,
            chat_service=ChatCompletionService(manager, limits, metrics),
            completion_service=CompletionService(manager, limits, metrics),
            response_store=store,
            responses_service=ResponsesService(manager, store, limits, metrics),
            upstreams=upstreams,
            forwarder=Forwarder(manager, upstreams, metrics),
            ray=ray,
            registry_file=RegistryFile(registry.sources[0]) if registry.sources else None,
            convert_cache=ConvertCache(root, settings.models.convert_cache_max)
            if (root := settings.models.convert_cache_root()) is not None
            else None,
            started_at=time.time(),
        )

    def dependencies(self) -> dict[str, Provide]:
        """Each service under its field's name: a handler parameter ``manager: NamedDependency[ModelManager]``."""
        return {
            f.name: Provide(_constant(getattr(self, f.name)), use_cache=True, sync_to_thread=False)
            for f in dataclasses.fields(self)
        }


def _constant(value: Any) -> Any:
    def provide() -> Any:
        return value

    return provide


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
    """Build the app and the services it runs on (``app.state.services``)."""
    services = Services.build(settings, registry, model_factory)
    manager = services.manager

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        if services.ray is not None:
            await asyncio.to_thread(services.ray.start)
        for name in settings.manager.preload:
            logger.info("preloading %s", name)
            await manager.load(name)  # a model that cannot load stops the start-up, with its error
        idle_unloader = asyncio.create_task(manager.run_idle_unloader()) if settings.manager.idle_unload else None
        sampler = asyncio.create_task(manager.run_sampler())
        try:
            yield
        finally:
            sampler.cancel()
            if idle_unloader is not None:
                idle_unloader.cancel()
            await manager.close()
            await services.upstreams.close()
            services.response_store.close()
            if services.ray is not None:
                await asyncio.to_thread(services.ray.stop)

    app = Litestar(
        route_handlers=[OpenAIController, ResponsesController, HealthController, AdminAPIController, MetricsController],
        dependencies=services.dependencies(),
        guards=[services.access.guard],  # every route: closed unless its handler declares an Access level
        exception_handlers={
            **EXCEPTION_HANDLERS,
            SignInRequired: handle_sign_in_required,
            UpstreamErrorResponse: handle_upstream_error,
        },
        lifespan=[lifespan],
        openapi_config=None,
        logging_config=None,  # the CLI configures logging (one redacting handler); Litestar would replace it
        middleware=[access_log_middleware(services.metrics), access_middleware(services.access, OpenAIController.path)],
        request_max_body_size=settings.limits.max_body_size,
        plugins=list(installed_plugins() if plugins is None else plugins),
    )
    app.state.services = services  # for the process around the app (the CLI's shutdown, tests), not for handlers
    return app
