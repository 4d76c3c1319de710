"""Every backend clemproxy runs, by the name registry entries give in ``backend``.

Adding a backend is one module with a ``Model`` subclass and one line here. Importing this imports no
model library: each backend imports its own (torch, llama_cpp) when it loads or is asked about the GPU.
"""

from __future__ import annotations

from typing import Any

from backends.huggingface.model import HuggingfaceLocalModel
from backends.llamacpp.model import LlamaCppModel
from backends.model import Model
from backends.openai_compatible import OpenAICompatibleModel

BACKENDS: dict[str, type[Model]] = {
    LlamaCppModel.backend_name: LlamaCppModel,
    HuggingfaceLocalModel.backend_name: HuggingfaceLocalModel,
    OpenAICompatibleModel.backend_name: OpenAICompatibleModel,
}


def gpu_summary() -> dict[str, Any]:
    """Which backend can use a GPU here, as each backend class tells (imports torch and llama.cpp). A backend
    whose library is missing has no GPU."""
    backends: dict[str, bool] = {}
    names: list[str] = []
    for backend, kind in BACKENDS.items():
        try:
            backends[backend] = kind.gpu_available()
            names += [name for name in kind.gpu_names() if name not in names]
        except ImportError:
            backends[backend] = False
    return {"backends": backends, "names": names, "present": any(backends.values())}
