"""clembench's model layer: registry, ModelSpec, Model and one module per backend.

Knows nothing of HTTP; ``proxy`` builds on it, never the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends.catalog import BACKENDS
from backends.errors import (
    BackendError,
    ContextLengthExceededError,
    InvalidModelEntryError,
    ModelLoadError,
    UnknownModelError,
    UnsupportedBackendError,
)
from backends.model import GenerationOutcome, GenerationParams, LoadOptions, Model, PreparedPrompt
from backends.registry.entries import ModelRegistry, RegistryEntry, RegistryFileError
from backends.spec import ModelSpec

__all__ = [
    "BACKENDS",
    "BackendError",
    "ContextLengthExceededError",
    "GenerationOutcome",
    "GenerationParams",
    "InvalidModelEntryError",
    "LoadOptions",
    "Model",
    "ModelLoadError",
    "ModelRegistry",
    "ModelSpec",
    "PreparedPrompt",
    "RegistryEntry",
    "RegistryFileError",
    "UnknownModelError",
    "UnsupportedBackendError",
    "backend_of",
    "create_model",
]


def backend_of(spec: Mapping[str, Any]) -> type[Model]:
    """The class that runs an entry's ``backend``."""
    backend = spec.get("backend")
    try:
        return BACKENDS[str(backend)]
    except KeyError:
        raise UnsupportedBackendError(
            f"The model '{spec.get('model_name')}' uses backend '{backend}', which this version of clemproxy cannot run"
        ) from None


def create_model(spec: ModelSpec, options: LoadOptions | None = None) -> Model:
    """An unloaded ``Model`` for a resolved spec, of the class its ``backend`` names."""
    return backend_of(spec)(spec, options)
