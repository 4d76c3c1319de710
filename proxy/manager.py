"""``ModelManager``: the one owner of every loaded model.

For now it loads a model on its first request and keeps it; loads are
serialised per model (two concurrent first requests load it once), and a
model runs one generation at a time, since a llama.cpp context is not
thread-safe. Blocking work runs on worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from backends import LoadOptions, Model, ModelRegistry, ModelSpec, create_model

logger = logging.getLogger(__name__)

ModelFactory = Callable[[ModelSpec, LoadOptions], Model]


class ModelManager:
    def __init__(self, registry: ModelRegistry, options: LoadOptions, factory: ModelFactory = create_model) -> None:
        self.registry = registry
        self.options = options
        self._factory = factory
        self._models: dict[str, Model] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._run_locks: dict[str, asyncio.Lock] = {}

    def loaded_names(self) -> list[str]:
        return [name for name, model in self._models.items() if model.is_loaded]

    def loaded(self, name: str) -> Model | None:
        """The model loaded for a registry name, if any; loads nothing."""
        model = self._models.get(name)
        return model if model is not None and model.is_loaded else None

    async def get(self, name: str) -> Model:
        """The loaded model for a registry name, loading it first if needed."""
        spec = self.registry.resolve(name)  # 404 / 400 before anything is loaded
        model = self._models.get(name)
        if model is not None and model.is_loaded:
            return model
        async with self._load_locks.setdefault(name, asyncio.Lock()):
            model = self._models.get(name)
            if model is None or not model.is_loaded:
                model = self._factory(spec, self.options)
                await asyncio.to_thread(model.load)
                self._models[name] = model
        return model

    @asynccontextmanager
    async def running(self, model: Model) -> AsyncIterator[Model]:
        """Hold the model's generation slot for the duration of one generation."""
        async with self._run_locks.setdefault(model.name, asyncio.Lock()):
            yield model

    async def close(self) -> None:
        models, self._models = self._models, {}
        for model in models.values():
            await asyncio.to_thread(model.unload)
