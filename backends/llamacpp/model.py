"""The ``llamacpp`` backend: GGUF models through llama-cpp-python's low-level API.

Loading reads the weights (``llama_model``), the chat template and special tokens from the GGUF metadata,
and starts a ``LlamaCppEngine``, which decodes every request of the model together in ``parallel`` slots that
keep each dialogue's cache. Tokenising runs on the caller's thread (llama.cpp's vocabulary is safe to share);
a generation hands its prompt to the engine and reads its tokens back.
"""

from __future__ import annotations

import codecs
import logging
import re
import threading
from collections.abc import Generator
from typing import Any

from backends.errors import ModelLoadError
from backends.model import GenerationOutcome, GenerationParams, Model, PreparedPrompt
from backends.placement import layers_on_gpu, requested_gpu_layers
from backends.spec import parse_context_size
from backends.text.grammar import GrammarCompiler
from backends.text.prompting import ensure_single_bos
from backends.weights.files import find_weight_files

logger = logging.getLogger(__name__)

N_BATCH = 512  # tokens in one decode: a step's generating tokens plus prompt chunks (llama.cpp's n_ubatch)

# llama.cpp's log levels (ggml_log_level) as logging's; llama-cpp-python's own mapping predates DEBUG = 1.
LLAMA_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
# The KV cache is shared by the slots, so a sequence may in principle be longer than the model was trained
# for; each request is held to its context window, so llama.cpp's warning about it says nothing here.
HARMLESS = ("possible training context overflow",)
_log_callback: Any = None  # referenced, so that ctypes does not free it while llama.cpp holds it
# llama.cpp's lines naming the buffers a model's weights went to ("AMX model buffer size = 95.00 MiB"), so
# that a load can say where its weights are; each load trims it to the last few.
BUFFER_LINES: list[str] = []
_BUFFER_LINE = re.compile(r"(\S+) model buffer size\s*=\s*([\d.]+ \w+)")


def route_llama_log() -> None:
    """llama.cpp logs through this module's logger, warnings and errors only, instead of printing to stderr."""
    global _log_callback
    if _log_callback is not None:
        return
    import ctypes

    import llama_cpp

    llama_logger = logging.getLogger("llama_cpp")
    pending: list[str] = []
    last_level = [logging.DEBUG]

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, _: Any) -> None:
        if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line
            last_level[0] = LLAMA_LOG_LEVELS.get(level, logging.DEBUG)
        pending.append(text.decode("utf-8", errors="replace"))
        if pending[-1].endswith("\n"):
            line = "".join(pending).rstrip()
            pending.clear()
            if "model buffer size" in line:
                BUFFER_LINES.append(line)
            if not any(phrase in line for phrase in HARMLESS):
                llama_logger.log(last_level[0], "%s", line)

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def build_has_amx() -> bool:
    """Whether this llama.cpp build carries ggml's AMX kernels (a native build on a CPU with AMX does)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    return bool(re.search(r"AMX_INT8 = 1", info))


def weight_buffers(lines: list[str]) -> dict[str, str]:
    """``{"CPU_Mapped": "100.00 MiB", "AMX": "95.00 MiB"}`` from llama.cpp's lines of one load."""
    found: dict[str, str] = {}
    for line in lines:
        match = _BUFFER_LINE.search(line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


class LlamaCppModel(Model):
    backend_name = "llamacpp"
    mandatory_keys = ("huggingface_id", "filename", "premade_chat_template", "eos_to_cull")
    batches = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model: Any = None  # llama_cpp._internals.LlamaModel
        self._engine: Any = None  # backends.llamacpp.engine.LlamaCppEngine
        self._info: dict[str, Any] = {}

    @classmethod
    def gpu_available(cls) -> bool:
        """A GPU build of llama.cpp (CUDA, Metal, Vulkan...)."""
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())

    @property
    def is_loaded(self) -> bool:
        return self._engine is not None

    def load(self) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        from backends.llamacpp.engine import LlamaCppEngine

        route_llama_log()

        self.progress.enter("finding weights")
        files = find_weight_files(self.spec, progress=self.progress)
        self.progress.enter("reading weights")
        gpu = self.gpu_available()
        n_gpu_layers = requested_gpu_layers(self.spec, gpu)
        warnings = []
        if n_gpu_layers != 0 and not gpu:
            warnings.append("GPU offload requested, but this llama.cpp build has no GPU support: running on CPU")
            logger.warning("%s: %s", self.name, warnings[-1])
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers < 0 else n_gpu_layers  # all of them, as Llama() does
        repack, repack_reason = self._repack_weights()
        params.use_extra_bufts = repack  # off: the weights stay in the plain CPU buffer, as llama-server --no-repack
        logger.info(
            "%s: loading %s (n_gpu_layers=%d, weight repacking %s: %s)",
            self.name,
            files.main,
            n_gpu_layers,
            "on" if repack else "off",
            repack_reason,
        )
        del BUFFER_LINES[:-16]
        lines_before = len(BUFFER_LINES)
        try:
            model = LlamaModel(path_model=str(files.main), params=params, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp could not load {files.main}: {exc}") from exc
        buffers = weight_buffers(BUFFER_LINES[lines_before:])
        logger.info(
            "%s: weights in %s", self.name, ", ".join(f"{k} ({v})" for k, v in buffers.items()) or "unknown buffers"
        )
        self.progress.enter("starting the engine")
        n_ctx_train = model.n_ctx_train()
        self.context_size = self.context_window(n_ctx_train)
        slots = self.slots_of(self.spec, self.options)
        kv_size = parse_context_size(self.spec["kv_cache_size"]) if "kv_cache_size" in self.spec else None
        if kv_size is None:
            # Every slot can hold a whole context, up to the server's --context-size per slot: an entry with a
            # long window (clembench writes "128k" for many) gets one full-length dialogue, or several short
            # ones, rather than slots x 128k tokens of cache allocated up front.
            kv_size = min(slots * self.context_size, max(self.context_size, slots * self.options.context_size))
        try:
            engine = LlamaCppEngine(
                model.model,
                model.vocab,
                name=self.name,
                slots=slots,
                kv_size=kv_size,
                n_batch=N_BATCH,
                threads=self.options.llama_threads(),
            )
        except RuntimeError as exc:
            model.close()  # type: ignore[no-untyped-call]
            raise ModelLoadError(f"{self.name}: {exc}") from exc

        metadata = model.metadata()
        bos_token = self.special_token_text(self._token_text(model, metadata, "bos"), "bos_string")
        eos_token = self.special_token_text(self._token_text(model, metadata, "eos"), "eos_string")
        own = {"default": metadata.get("tokenizer.chat_template", "")}  # and named ones (tool_use, rag, ...)
        prefix = "tokenizer.chat_template."
        own.update({key.removeprefix(prefix): value for key, value in metadata.items() if key.startswith(prefix)})
        template = self.set_templates(own, bos_token=bos_token, eos_token=eos_token)
        if template.warning:
            warnings.append(template.warning)
        architecture = metadata.get("general.architecture", "")
        n_layers = int(metadata.get(f"{architecture}.block_count", 0) or 0)
        self._model, self._engine = model, engine
        self._info = {
            "file": str(files.main),
            "weights_from": files.origin,
            "context_size": self.context_size,
            "context_size_trained": n_ctx_train,
            "chat_template": template.origin,
            "gpu_available": gpu,  # a GPU build of llama.cpp
            "gpu_layers_requested": n_gpu_layers,
            # llama.cpp offloads the repeating layers plus the output layer: n_layers + 1 in all.
            "layers_total": n_layers + 1 if n_layers else None,
            "layers_on_gpu": layers_on_gpu(n_gpu_layers, n_layers + 1) if gpu and n_layers else 0,
            "device": "gpu" if gpu and n_gpu_layers != 0 else "cpu",
            "weight_buffers": buffers,  # llama.cpp's buffer types holding the weights, and their sizes
            "repack_weights": repack,
            "repack_weights_why": repack_reason,
            "model_bytes": model.size(),
            "parameters": model.n_params(),
            "warnings": warnings,
        }
        logger.info(
            "%s: loaded (%s template, context %d, %d slots sharing %d cached tokens, %d threads)",
            self.name,
            template.origin,
            self.context_size,
            slots,
            engine.kv_size,
            engine.threads,
        )

    def _repack_weights(self) -> tuple[bool, str]:
        """Whether llama.cpp may repack the weights into its extra buffer types (AMX, CPU_REPACK), and why."""
        if "repack_weights" in self.spec:
            return bool(self.spec["repack_weights"]), "the entry's repack_weights"
        chosen = self.options.repack_weights
        if chosen in ("on", "off"):
            return chosen == "on", f"--repack-weights {chosen}"
        if build_has_amx():
            return False, "this llama.cpp has AMX kernels, which crash on prompt batches (ggml-org/llama.cpp#20824)"
        return True, "default"

    @staticmethod
    def _token_text(model: Any, metadata: dict[str, str], which: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{which}_token_id")
        if token_id is not None and int(token_id) >= 0:
            return str(model.token_get_text(int(token_id)))
        return None

    def load_info(self) -> dict[str, Any]:
        engine = self._engine
        return {**self._info, **(engine.describe() if engine is not None else {})}

    def healthy(self) -> bool:
        return self._engine is None or self._engine.alive

    def set_threads(self, threads: int) -> None:
        if self._engine is not None:
            self._engine.set_threads(threads)

    def unload(self) -> None:
        engine, self._engine = self._engine, None
        model, self._model = self._model, None
        if engine is not None:
            engine.close()
        if model is not None:
            model.close()
        self._grammar = None
        self.chat_template = None

    def _new_grammar_compiler(self) -> GrammarCompiler:
        import llama_cpp

        vocab = self._require_loaded().vocab
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        return GrammarCompiler.for_llama_vocab(vocab, n_vocab, eog)

    def tokenize_prompt(self, text: str) -> list[int]:
        model = self._require_loaded()
        token_ids = model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return ensure_single_bos(token_ids, model.token_bos(), model.add_bos_token())

    def generate_tokens(
        self, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event, outcome: GenerationOutcome
    ) -> Generator[str, None, None]:
        import llama_cpp

        from backends.engine.loop import engine_tokens
        from backends.engine.slots import EngineRequest
        from backends.llamacpp.sampling import token_piece

        model = self._require_loaded()
        engine = self._engine
        outcome.finish_reason = "length"
        if prompt.max_tokens <= 0:
            return
        request = EngineRequest(prompt.token_ids, prompt.max_tokens, params, cancel=cancel, constraint=prompt.matcher())
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens = engine_tokens(engine, request, outcome)
        try:
            for token in tokens:
                text = decoder.decode(token_piece(llama_cpp, model.vocab, token))
                if text:
                    yield text
        finally:
            tokens.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def _require_loaded(self) -> Any:
        if self._model is None:
            raise RuntimeError(f"{self.name} is not loaded")
        return self._model
