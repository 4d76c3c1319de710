"""Where a model runs, as the registry's placement keys ask, for every backend.

``execute_on`` (``gpu``/``cpu``) wins; else ``gpu_layers_offloaded``; else
everything on the GPU when there is one. Each backend turns the layer count
into its own terms (llama.cpp's ``n_gpu_layers``, a transformers device map).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ALL_LAYERS = -1  # llama.cpp's convention, used by every backend here


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
