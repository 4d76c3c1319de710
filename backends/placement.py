"""Where a model runs, as the registry's placement keys ask, for every backend.

``execute_on`` (``gpu``/``cpu``) wins; else ``gpu_layers_offloaded``; else
everything on the GPU when there is one. Each backend turns the layer count
into its own terms (llama.cpp's ``n_gpu_layers``, a transformers device map).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from backends.errors import InvalidPlacementError

ALL_LAYERS = -1  # llama.cpp's convention, used by every backend here

# The registry's placement keys, which a load may also override, and what each accepts.
PLACEMENT_KEYS: dict[str, Callable[[Any], bool]] = {
    "execute_on": lambda v: v in ("gpu", "cpu"),
    "gpu_layers_offloaded": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= ALL_LAYERS,
}


def check_placement(override: Mapping[str, Any], keys: Mapping[str, Callable[[Any], bool]] = PLACEMENT_KEYS) -> None:
    """A load's placement override: only placement keys, each with a value it accepts."""
    for key, value in override.items():
        check = keys.get(key)
        if check is None:
            raise InvalidPlacementError(
                f"'{key}' cannot be set for a load; only {', '.join(keys)} can", param=key, code="unsupported_parameter"
            )
        if not check(value):
            raise InvalidPlacementError(f"Invalid value {value!r} for '{key}'", param=key)


def requested_gpu_layers(spec: Mapping[str, Any], gpu_available: bool) -> int:
    """How many layers the entry wants on the GPU: ``ALL_LAYERS``, 0 or a count."""
    execute_on = spec.get("execute_on")
    if execute_on == "gpu":
        return ALL_LAYERS
    if execute_on == "cpu":
        return 0
    if "gpu_layers_offloaded" in spec:
        return int(spec["gpu_layers_offloaded"])
    return ALL_LAYERS if gpu_available else 0


def layers_on_gpu(requested: int, total: int) -> int:
    """How many of ``total`` layers a request for ``requested`` puts on the GPU."""
    return total if requested < 0 else min(requested, total)
