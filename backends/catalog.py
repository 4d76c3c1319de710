"""Every backend clemproxy runs, by the name registry entries give in ``backend``.

Adding a backend is one module with a ``Model`` subclass and one line here. Importing this imports no
model library: each backend imports its own (torch, llama_cpp) when it loads or is asked about the GPU.
"""

from __future__ import annotations

from backends.huggingface_local import HuggingfaceLocalModel
from backends.llamacpp import LlamaCppModel
from backends.model import Model
from backends.openai_compatible import OpenAICompatibleModel

BACKENDS: dict[str, type[Model]] = {
    LlamaCppModel.backend_name: LlamaCppModel,
    HuggingfaceLocalModel.backend_name: HuggingfaceLocalModel,
    OpenAICompatibleModel.backend_name: OpenAICompatibleModel,
}
