"""The Litestar application factory."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State

from backends import LoadOptions, ModelRegistry, create_model
from proxy.errors import EXCEPTION_HANDLERS
from proxy.manager import ModelFactory, ModelManager
from proxy.routes import DEPENDENCIES, HealthController, OpenAIController
from proxy.settings import Settings

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings, *, registry: ModelRegistry | None = None, model_factory: ModelFactory | None = None
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
        manager = ModelManager(registry, options, model_factory or create_model)
        app.state.manager = manager
        try:
            yield
        finally:
            await manager.close()

    return Litestar(
        route_handlers=[OpenAIController, HealthController],
        dependencies=DEPENDENCIES,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        state=State({"settings": settings, "registry": registry, "started_at": time.time()}),
        openapi_config=None,
    )
