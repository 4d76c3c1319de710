"""The ``huggingface_local`` backend: transformers causal LMs with torch, on CPU or GPU.

Checkpoints are a directory with ``config.json`` (local, from an installed
package, or downloaded from the hub by ``backends.weights.files``) or one GGUF file
(``gguf_file``), which transformers dequantises; so one GGUF can be served by
both backends. transformers only ever reads local files here.

Generation goes through ``TransformersEngine`` (``backends.huggingface.engine``), which decodes every request of
the model together in ``parallel`` slots that keep each dialogue's KV cache, a token at a time, so streaming,
cancellation and token counts are exact and the stop conditions are ours. A model the engine cannot batch (one
with sliding-window layers) is served by a token loop of its own per request, which recomputes every prompt.

Weights are float32 on the CPU unless the entry's ``dtype`` says otherwise (``bfloat16`` halves the memory and
changes the outputs a little; on the 2-core reference machine it decoded one stream no faster than float32,
whose small products ``backends.huggingface.cpu_linear`` tunes, and four streams a tenth faster), bfloat16 or
float16 on a GPU.
"""

from __future__ import annotations

import gc
import inspect
import logging
import threading
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.engine.slots import EngineRequest
from backends.errors import ModelLoadError
from backends.model import GenerationOutcome, GenerationParams, Model, PreparedPrompt, token_logprob
from backends.placement import ALL_LAYERS, layers_on_gpu, requested_gpu_layers
from backends.text.grammar import GrammarCompiler
from backends.text.prompting import ensure_single_bos
from backends.weights.convert_cache import ORIGIN, ConvertCache, Use, convert_gguf
from backends.weights.files import ModelSource, find_adapter, find_model_source

if TYPE_CHECKING:  # torch and transformers are imported when a model loads, not with the registry
    from backends.huggingface.engine import TransformersEngine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where and in which precision the weights go."""

    device: str  # "cpu" or "cuda"
    dtype: str  # a torch dtype name: "float32", "bfloat16", "float16"
    gpu_layers: int  # ALL_LAYERS, 0, or how many decoder layers go on the GPU (the rest stay on the CPU)
    warnings: tuple[str, ...] = ()


def choose_placement(spec: Mapping[str, Any], cuda_available: bool, bf16_supported: bool) -> Placement:
    """The entry's placement keys on this machine: the entry's ``dtype`` if it has one, else bf16 (or fp16) on
    a GPU and fp32 on the CPU.

    fp32 on the CPU by default: it is what the weights mean; bf16 halves the memory (and, on CPUs with native
    bf16, the weights a step reads), but rounds every product, so the outputs change.
    """
    dtype = spec.get("dtype")
    gpu_layers = requested_gpu_layers(spec, cuda_available)
    if gpu_layers == 0:
        return Placement("cpu", dtype or "float32", 0)
    if not cuda_available:
        warning = "the entry asks for the GPU, but torch sees no CUDA device: running on the CPU"
        return Placement("cpu", dtype or "float32", 0, (warning,))
    return Placement("cuda", dtype or ("bfloat16" if bf16_supported else "float16"), gpu_layers)


def decoder_layer_path(model: Any) -> tuple[str, int]:
    """The dotted name of the model's list of decoder layers (``model.layers`` for most) and its length."""
    import torch

    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ModelLoadError("cannot find the decoder layers of this model to split it between GPU and CPU")
    return max(lists, key=lambda item: item[1])


def partial_device_map(model_skeleton: Any, gpu_layers: int) -> dict[str, int | str]:
    """A transformers ``device_map`` with the first ``gpu_layers`` decoder layers on GPU 0, the rest on the CPU.

    ``model_skeleton`` is the model built on the meta device, so no weights are touched.
    """
    path, count = decoder_layer_path(model_skeleton)
    device_map: dict[str, int | str] = {}
    parts = path.split(".")
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        module = model_skeleton.get_submodule(parent) if parent else model_skeleton
        for child, _ in module.named_children():
            if child != parts[depth]:
                device_map[f"{parent}.{child}" if parent else child] = "cpu"
    for index in range(count):
        device_map[f"{path}.{index}"] = 0 if index < gpu_layers else "cpu"
    return device_map


def quantization_config(spec: Mapping[str, Any], placement: Placement, cuda: bool) -> Any:
    """bitsandbytes' settings for ``load_in_8bit`` / ``load_in_4bit``, or None. They need the weights on a CUDA
    GPU: anything else is a load error naming the key, never a silent full-precision load."""
    keys = [key for key in ("load_in_8bit", "load_in_4bit") if spec.get(key)]
    if not keys:
        return None
    if len(keys) > 1:
        raise ModelLoadError("load_in_8bit and load_in_4bit are both set: choose one")
    key = keys[0]
    if placement.device != "cuda" or placement.gpu_layers != ALL_LAYERS:
        where = "this machine has no CUDA GPU" if not cuda else "the entry places (some of) the model on the CPU"
        raise ModelLoadError(
            f"{key}: bitsandbytes quantisation needs every layer on a CUDA GPU, and {where}; remove {key} to load "
            f"the model in {placement.dtype} (full precision, several times the memory)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"{key}: needs the bitsandbytes package (pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    config: Any = BitsAndBytesConfig
    return config(**{key: True})


def with_adapter(model: Any, adapter: Path, merge: bool) -> Any:
    """The model with a PEFT (LoRA) adapter on top, merged into its weights where they are not quantised: a
    merged model costs nothing per token and is a plain model to the engine."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError("peft_model: needs the peft package (pip install peft)") from None
    wrapped = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    return wrapped.merge_and_unload() if merge else wrapped


def load_tokenizer(source: ModelSource, slow: bool, trust_remote_code: bool = False) -> tuple[Any, list[str]]:
    """The checkpoint's tokenizer, and warnings an operator should see.

    transformers 5 has no ``use_fast=False``: every tokenizer is built on the ``tokenizers`` library, except
    the SentencePiece-backed Python tokenizers (``SentencePieceBackend``), which do what the old slow
    tokenizers did. ``slow_tokenizer: true`` takes one when the checkpoint ships a SentencePiece
    ``tokenizer.model``; otherwise the fast tokenizer is used and the entry gets a warning.
    """
    from transformers import AutoTokenizer

    warnings = []
    if slow and source.gguf_file is None and (source.directory / "tokenizer.model").is_file():
        try:
            from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

            return SentencePieceBackend.from_pretrained(str(source.directory), local_files_only=True), []
        except ImportError:
            warnings.append("slow_tokenizer is set, but the sentencepiece package is missing: using the fast tokenizer")
    code = {"trust_remote_code": True} if trust_remote_code else {}
    tokenizer = AutoTokenizer.from_pretrained(
        str(source.directory), gguf_file=source.gguf_file, local_files_only=True, **code
    )
    if slow and not warnings and not _is_python_tokenizer(tokenizer):
        kind = "a GGUF checkpoint" if source.gguf_file else "this checkpoint (it has no SentencePiece tokenizer.model)"
        warnings.append(
            f"slow_tokenizer is set, but transformers offers no slow tokenizer for {kind}: using the fast "
            "tokenizer, whose output may differ from what this entry was tuned for"
        )
    return tokenizer, warnings


def _is_python_tokenizer(tokenizer: Any) -> bool:
    from transformers.tokenization_python import PythonBackend

    return isinstance(tokenizer, PythonBackend)


class IncrementalDetokenizer:
    """Text deltas from token ids, one token at a time, as text-generation-inference does it.

    Decoding a token alone loses what depends on its neighbours (a SentencePiece word's leading space, a
    character split over several byte tokens), so each step decodes a short window and emits only what is
    new and complete; the deltas add up to the decoded whole. Special tokens are skipped: they never reach
    the client.
    """

    def __init__(self, tokenizer: Any, lock: threading.Lock | None = None) -> None:
        self._tokenizer = tokenizer
        self._lock = lock or threading.Lock()
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        with self._lock:
            return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return text[len(prefix) :]
        return ""

    def finish(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :]


class HuggingfaceLocalModel(Model):
    backend_name = "huggingface_local"
    mandatory_keys = ("huggingface_id", "premade_chat_template", "eos_to_cull")
    batches = True

    @classmethod
    def gpu_available(cls) -> bool:
        import torch

        return bool(torch.cuda.is_available())

    @classmethod
    def gpu_names(cls) -> list[str]:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cls.gpu_available() else []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._adds_bos = False
        self._cache_name = "past_key_values"
        # A fast tokenizer is one Rust object; prompts are tokenised while another request's output is decoded.
        self._tokenizer_lock = threading.Lock()
        self._engine: TransformersEngine | None = None  # None for a model the engine cannot batch
        self._conversion: Use | None = None  # the cached conversion of a GGUF this model was loaded from
        self._info: dict[str, Any] = {}

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from backends.huggingface.cpu_linear import tune_small_batch_linears
        from backends.huggingface.engine import TransformersEngine, batching_unsupported, on_a_thread_that_ends

        if self.options.threads > 0:  # this model's share of the server's threads (it runs in a worker process)
            torch.set_num_threads(self.options.threads)
        self.progress.enter("finding weights")
        source = find_model_source(self.spec, progress=self.progress)
        cuda = torch.cuda.is_available()
        placement = choose_placement(self.spec, cuda, cuda and torch.cuda.is_bf16_supported())
        quantization = quantization_config(self.spec, placement, cuda)  # refused before anything is fetched
        adapter = find_adapter(self.spec, self.progress) if self.spec.get("peft_model") else None
        code = {"trust_remote_code": True} if self.spec.get("trust_remote_code") else {}
        weight_arguments: dict[str, Any] = dict(code)
        if self.spec.get("attn_implementation"):
            weight_arguments["attn_implementation"] = str(self.spec["attn_implementation"])
        if quantization is not None:
            weight_arguments["quantization_config"] = quantization
        gguf_path = source.directory / source.gguf_file if source.gguf_file else None
        if gguf_path is not None and (root := self.options.convert_cache_root()) is not None:
            source = self._converted(
                source, gguf_path, placement.dtype, ConvertCache(root, self.options.convert_cache_max)
            )
        where = f"{source.directory / source.gguf_file}" if source.gguf_file else str(source.directory)
        logger.info("%s: loading %s (%s, %s)", self.name, where, placement.device, placement.dtype)
        gguf = " from GGUF" if source.gguf_file else ""
        try:
            self.progress.enter(f"reading the tokenizer{gguf}")
            tokenizer, warnings = load_tokenizer(source, bool(self.spec.get("slow_tokenizer")), **code)
            config = AutoConfig.from_pretrained(
                str(source.directory), gguf_file=source.gguf_file, local_files_only=True, **code
            )
            device_map = self._device_map(config, placement)
            self.progress.enter("dequantising the GGUF weights" if source.gguf_file else "reading weights")

            def load_weights() -> tuple[Any, dict[str, Any]]:
                model = AutoModelForCausalLM.from_pretrained(
                    str(source.directory),
                    gguf_file=source.gguf_file,
                    dtype=getattr(torch, placement.dtype),
                    device_map=device_map,
                    local_files_only=True,
                    **weight_arguments,
                )
                if adapter is not None:
                    model = with_adapter(model, adapter, merge=quantization is None)
                return model, tune_small_batch_linears(model)

            model, kernels = on_a_thread_that_ends(load_weights)
        except BaseException as exc:
            self._release_conversion()
            if isinstance(exc, (OSError, ValueError, RuntimeError, ImportError, KeyError, TypeError)):
                raise ModelLoadError(f"transformers could not load {where}: {type(exc).__name__}: {exc}") from exc
            raise
        model.eval()
        warnings = [*placement.warnings, *warnings]
        for warning in warnings:
            logger.warning("%s: %s", self.name, warning)

        self.context_size = self.context_window(getattr(config, "max_position_embeddings", None))
        template = self.set_templates(
            self._own_chat_templates(tokenizer),
            bos_token=self.special_token_text(tokenizer.bos_token, "bos_string"),
            eos_token=self.special_token_text(tokenizer.eos_token, "eos_string"),
        )
        if template.warning:
            warnings.append(template.warning)
        self._eos_ids = self._end_of_sequence_ids(model, tokenizer)
        self._adds_bos = self._tokenizer_adds_bos(tokenizer)
        # transformers 5 renames the KV-cache argument and output from past_key_values to cache, model by model.
        self._cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._tokenizer = tokenizer
        slots = self.slots_of(self.spec, self.options)
        unbatched = batching_unsupported(config)
        if unbatched is None:
            self._engine = TransformersEngine(
                model,
                name=self.name,
                slots=slots,
                context_size=self.context_size,
                eos_ids=self._eos_ids,
                cache_argument=self._cache_name,
                token_bytes=self._token_bytes,
            )
        else:
            warnings.append(f"requests are decoded one at a time, each prompt computed anew: {unbatched}")
            logger.warning("%s: %s", self.name, warnings[-1])
        self._model = model
        n_layers = getattr(config, "num_hidden_layers", None)
        self._info = {
            "source": where,
            "weights_from": source.origin,
            "converted_from": str(gguf_path) if self._conversion is not None else None,
            "device": self._device_summary(model),
            "dtype": str(model.dtype).removeprefix("torch."),
            "gpu_available": cuda,
            "gpu_layers_requested": placement.gpu_layers,
            "layers_total": n_layers,
            "layers_on_gpu": layers_on_gpu(placement.gpu_layers, n_layers or 0) if placement.device == "cuda" else 0,
            "parameters": sum(p.numel() for p in model.parameters()),
            "model_bytes": model.get_memory_footprint(),
            "tokenizer": type(tokenizer).__name__,
            "context_size": self.context_size,
            "context_size_trained": getattr(config, "max_position_embeddings", None),
            "chat_template": template.origin,
            "batching": "engine" if self._engine is not None else "one request at a time",
            # weight shape: the row counts computed as W @ x.T (backends.huggingface.cpu_linear)
            "small_batch_kernels": kernels,
            "adapter": str(adapter) if adapter is not None else None,  # a LoRA adapter, merged into the weights
            "quantization": next((k for k in ("load_in_8bit", "load_in_4bit") if self.spec.get(k)), None),
            "trust_remote_code": bool(code),
            "warnings": warnings,
        }
        logger.info(
            "%s: loaded on %s as %s (%s template, context %d, %s)",
            self.name,
            self._info["device"],
            self._info["dtype"],
            template.origin,
            self.context_size,
            f"{slots} slots" if self._engine is not None else "unbatched",
        )

    @staticmethod
    def _device_map(config: Any, placement: Placement) -> str | dict[str, int | str]:
        if placement.device == "cpu":
            return "cpu"
        n_layers = getattr(config, "num_hidden_layers", None)
        if placement.gpu_layers == ALL_LAYERS or (n_layers and placement.gpu_layers >= n_layers):
            return "cuda:0"
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from_config: Any = AutoModelForCausalLM.from_config
        with init_empty_weights():
            skeleton = from_config(config)
        return partial_device_map(skeleton, placement.gpu_layers)

    @staticmethod
    def _own_chat_templates(tokenizer: Any) -> dict[str, str]:
        """The tokenizer's chat templates: ``"default"``, and named ones (tool use, RAG, a language's...) where it
        has several, which ``chat_template_language`` picks from."""
        template = tokenizer.chat_template
        if isinstance(template, dict):
            return {str(name): text for name, text in template.items() if isinstance(text, str)}
        return {"default": template} if isinstance(template, str) else {}

    @staticmethod
    def _device_summary(model: Any) -> str:
        devices = sorted({str(p.device) for p in model.parameters()}, key=lambda d: (d == "cpu", d))
        return "+".join(devices)

    @staticmethod
    def _end_of_sequence_ids(model: Any, tokenizer: Any) -> frozenset[int]:
        """Every id that ends a turn: the generation config's (often several) and the tokenizer's EOS."""
        configured = model.generation_config.eos_token_id
        ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        return frozenset(ids)

    @staticmethod
    def _tokenizer_adds_bos(tokenizer: Any) -> bool:
        bos = tokenizer.bos_token_id
        if bos is None:
            return False
        with_special = tokenizer("x").input_ids
        without = tokenizer("x", add_special_tokens=False).input_ids
        return bool(with_special[:1] == [bos] and without[:1] != [bos])

    def load_info(self) -> dict[str, Any]:
        engine = self._engine
        return {**self._info, **(engine.describe() if engine is not None else {})}

    def _converted(self, source: ModelSource, gguf: Path, dtype: str, cache: ConvertCache) -> ModelSource:
        """The GGUF's converted checkpoint in the cache, converted now if this is its first load (or waited for,
        when another process converts it); held until the model unloads."""
        from backends.huggingface.engine import on_a_thread_that_ends

        def convert(target: Path) -> None:
            self.progress.enter("dequantising the GGUF weights (once: later loads read the converted copy)")
            on_a_thread_that_ends(lambda: convert_gguf(gguf, dtype, target))

        self.progress.enter("finding the converted copy of the GGUF")
        try:
            self._conversion = cache.use(gguf, dtype, convert)
        except (OSError, ValueError, RuntimeError, ImportError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"transformers could not convert {gguf}: {type(exc).__name__}: {exc}") from exc
        return ModelSource(self._conversion.path, None, f"{ORIGIN} ({source.origin})")

    def _release_conversion(self) -> None:
        conversion, self._conversion = self._conversion, None
        if conversion is not None:
            conversion.release()

    def healthy(self) -> bool:
        return self._engine is None or self._engine.alive

    def set_threads(self, threads: int) -> None:
        import torch

        if self._engine is not None:
            self._engine.set_threads(threads)  # torch's pool is per thread: the engine thread sets its own
        else:
            torch.set_num_threads(threads)  # threads started from now on take it

    def unload(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        self._release_conversion()
        model, self._model = self._model, None
        self._tokenizer = None
        self._grammar = None
        self.chat_template = None
        if model is None:
            return
        del model
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def tokenize_prompt(self, text: str) -> list[int]:
        tokenizer = self._require_loaded()[1]
        with self._tokenizer_lock:
            token_ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        return ensure_single_bos(token_ids, tokenizer.bos_token_id, self._adds_bos)

    def generate_tokens(
        self, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event, outcome: GenerationOutcome
    ) -> Generator[str, None, None]:
        tokenizer = self._require_loaded()[1]
        outcome.finish_reason = "length"
        if prompt.max_tokens <= 0:
            return
        detokenizer = IncrementalDetokenizer(tokenizer, self._tokenizer_lock)
        engine = self._engine
        if engine is not None:
            from backends.engine.loop import engine_tokens

            request = EngineRequest(
                prompt.token_ids, prompt.max_tokens, params, cancel=cancel, constraint=prompt.matcher()
            )
            tokens = engine_tokens(engine, request, outcome)
        else:
            tokens = self._tokens_alone(prompt, params, cancel, outcome)
        try:
            for token in tokens:
                text = detokenizer.push(token)
                if text:
                    yield text
        finally:
            tokens.close()
        tail = detokenizer.finish()
        if tail:
            yield tail

    def _tokens_alone(
        self, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event, outcome: GenerationOutcome
    ) -> Generator[int, None, None]:
        """For a model the engine cannot batch: a token loop of this request's own over a fresh cache."""
        import torch

        from backends.huggingface.engine import TorchSampler

        model = self._require_loaded()[0]
        device = model.get_input_embeddings().weight.device
        sampler = TorchSampler(params, device)
        constraint = prompt.matcher()
        next_input = torch.tensor([prompt.token_ids], device=device)
        cache = None
        with torch.inference_mode():
            while outcome.completion_tokens < prompt.max_tokens and not cancel.is_set():
                output = model(input_ids=next_input, use_cache=True, **{self._cache_name: cache})
                cache = getattr(output, self._cache_name)
                raw_logits = output.logits[0, -1, :].float()
                token = sampler.sample(raw_logits if constraint is None else constraint.allow_torch(raw_logits))
                if token in self._eos_ids:
                    outcome.finish_reason = "stop"
                    return
                outcome.completion_tokens += 1
                if params.logprobs:
                    outcome.logprobs.append(
                        token_logprob(raw_logits.cpu().numpy(), token, params.top_logprobs, self._token_bytes)
                    )
                yield token
                if constraint is not None:
                    constraint.accept(token)
                    if constraint.ended:
                        outcome.finish_reason = "stop"
                        return
                next_input = torch.tensor([[token]], device=device)

    def _new_grammar_compiler(self) -> GrammarCompiler:
        model, tokenizer = self._require_loaded()
        n_vocab = int(model.get_output_embeddings().weight.shape[0])  # the logits' width
        return GrammarCompiler.for_hf_tokenizer(tokenizer, n_vocab, self._eos_ids)

    def _token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes: byte-level BPE pieces map back to bytes; others are decoded text."""
        with self._tokenizer_lock:
            return str(self._tokenizer.decode([token_id], skip_special_tokens=False)).encode("utf-8")

    def _require_loaded(self) -> tuple[Any, Any]:
        if self._model is None:
            raise RuntimeError(f"{self.name} is not loaded")
        return self._model, self._tokenizer
