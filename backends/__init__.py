"""clembench's model layer: registry, ModelSpec, Model and one module per backend.

Knows nothing of HTTP; ``proxy`` builds on it, never the other way round.
"""

from __future__ import annotations

from backends.errors import (
    BackendError,
    ContextLengthExceededError,
    InvalidModelEntryError,
    ModelLoadError,
    UnknownModelError,
    UnsupportedBackendError,
)
from backends.model import GenerationOutcome, GenerationParams, LoadOptions, Model, PreparedPrompt
from backends.registry import ModelRegistry, RegistryEntry, RegistryFileError
from backends.spec import ModelSpec

__all__ = [
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
    "create_model",
]


def create_model(spec: ModelSpec, options: LoadOptions | None = None) -> Model:
    """An unloaded ``Model`` for a resolved spec, of the class its ``backend`` names."""
    backend = spec["backend"]
    if backend == "llamacpp":
        from backends.llamacpp import LlamaCppModel

        return LlamaCppModel(spec, options)
    if backend == "huggingface_local":
        from backends.huggingface_local import HuggingfaceLocalModel

        return HuggingfaceLocalModel(spec, options)
    raise UnsupportedBackendError(
        f"The model '{spec['model_name']}' uses backend '{backend}', which this version of clemproxy cannot run yet"
    )
