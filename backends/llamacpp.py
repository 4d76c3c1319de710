"""The ``llamacpp`` backend: GGUF models through llama-cpp-python."""

from __future__ import annotations

import codecs
import logging
import random
import threading
from collections.abc import Generator
from typing import Any

from backends.errors import ModelLoadError
from backends.model import GenerationOutcome, GenerationParams, Model, PreparedPrompt, token_logprob
from backends.placement import layers_on_gpu, requested_gpu_layers
from backends.prompting import choose_chat_template, ensure_single_bos
from backends.weights import find_weight_files

logger = logging.getLogger(__name__)


class LlamaCppModel(Model):
    backend_name = "llamacpp"
    mandatory_keys = ("huggingface_id", "filename", "premade_chat_template", "eos_to_cull")
    default_concurrency = 1  # a llama.cpp context is not thread-safe

    @classmethod
    def gpu_available(cls) -> bool:
        """A GPU build of llama.cpp (CUDA, Metal, Vulkan...)."""
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._llm: Any = None
        self._info: dict[str, Any] = {}

    @property
    def is_loaded(self) -> bool:
        return self._llm is not None

    def load(self) -> None:
        from llama_cpp import Llama

        files = find_weight_files(self.spec)
        gpu = self.gpu_available()
        n_gpu_layers = requested_gpu_layers(self.spec, gpu)
        warnings = []
        if n_gpu_layers != 0 and not gpu:
            warnings.append("GPU offload requested, but this llama.cpp build has no GPU support: running on CPU")
            logger.warning("%s: %s", self.name, warnings[-1])
        n_ctx = self.context_window(None)
        logger.info("%s: loading %s (n_gpu_layers=%d, n_ctx=%d)", self.name, files.main, n_gpu_layers, n_ctx)
        try:
            llm = Llama(model_path=str(files.main), n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp could not load {files.main}: {exc}") from exc
        n_ctx_train = llm._model.n_ctx_train()
        # llama.cpp may round n_ctx up; the window we enforce is what was asked for.
        self.context_size = min(self.context_window(n_ctx_train), llm.n_ctx())

        metadata = llm.metadata
        bos_token = self.special_token_text(self._token_text(llm, metadata, "bos"), "bos_string")
        eos_token = self.special_token_text(self._token_text(llm, metadata, "eos"), "eos_string")
        self.chat_template = choose_chat_template(
            self.spec, metadata.get("tokenizer.chat_template"), bos_token=bos_token, eos_token=eos_token
        )
        if self.chat_template.warning:
            warnings.append(self.chat_template.warning)
        architecture = metadata.get("general.architecture", "")
        n_layers = int(metadata.get(f"{architecture}.block_count", 0) or 0)
        self._llm = llm
        self._info = {
            "file": str(files.main),
            "weights_from": files.origin,
            "context_size": self.context_size,
            "context_size_trained": n_ctx_train,
            "chat_template": self.chat_template.origin,
            "gpu_available": gpu,  # a GPU build of llama.cpp
            "gpu_layers_requested": n_gpu_layers,
            # llama.cpp offloads the repeating layers plus the output layer: n_layers + 1 in all.
            "layers_total": n_layers + 1 if n_layers else None,
            "layers_on_gpu": layers_on_gpu(n_gpu_layers, n_layers + 1) if gpu and n_layers else 0,
            "device": "gpu" if gpu and n_gpu_layers != 0 else "cpu",
            "model_bytes": llm._model.size(),
            "parameters": llm._model.n_params(),
            "warnings": warnings,
        }
        logger.info("%s: loaded (%s template, context %d)", self.name, self.chat_template.origin, self.context_size)

    @staticmethod
    def _token_text(llm: Any, metadata: dict[str, str], which: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{which}_token_id")
        if token_id is not None and int(token_id) >= 0:
            return str(llm._model.token_get_text(int(token_id)))
        return None

    def load_info(self) -> dict[str, Any]:
        return dict(self._info)

    def unload(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()
        self.chat_template = None

    def tokenize_prompt(self, text: str) -> list[int]:
        llm = self._require_loaded()
        token_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return ensure_single_bos(token_ids, llm.token_bos(), llm._model.add_bos_token())

    def generate_tokens(
        self, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event, outcome: GenerationOutcome
    ) -> Generator[str, None, None]:
        import llama_cpp

        llm = self._require_loaded()
        # Without an explicit seed llama-cpp-python reuses one fixed seed; draw a fresh one so sampling varies.
        llm.set_seed(params.seed if params.seed is not None else random.randrange(2**31))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        history = list(prompt.token_ids)
        outcome.finish_reason = "length"
        if prompt.max_tokens <= 0:
            return
        scores: list[Any] = []  # the logits each token was sampled from, kept only when logprobs are asked for

        def capture(_: Any, logits: Any) -> Any:
            scores[:] = [logits.copy()]
            return logits

        # OpenAI semantics: temperature and top_p only, so top_k and min_p are switched off.
        tokens = llm.generate(
            prompt.token_ids,
            temp=params.temperature,
            top_p=params.top_p,
            top_k=0,
            min_p=0.0,
            repeat_penalty=1.0,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            reset=True,
            logits_processor=llama_cpp.LogitsProcessorList([capture]) if params.logprobs else None,
        )
        try:
            for token in tokens:
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                    outcome.finish_reason = "stop"
                    break
                if params.logprobs and scores:
                    outcome.logprobs.append(
                        token_logprob(
                            scores[0], token, params.top_logprobs, lambda i: llm.detokenize([i], special=True)
                        )
                    )
                piece = llm.detokenize([token], prev_tokens=history, special=False)
                history.append(token)
                outcome.completion_tokens += 1
                text = decoder.decode(piece)
                if text:
                    yield text
                if outcome.completion_tokens >= prompt.max_tokens or cancel.is_set():
                    break
        finally:
            tokens.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def _require_loaded(self) -> Any:
        if self._llm is None:
            raise RuntimeError(f"{self.name} is not loaded")
        return self._llm
