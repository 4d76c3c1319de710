"""The model contract every backend implements, and the generation types it uses.

A backend supplies loading, tokenising and raw token-by-token generation. The
parts that must behave the same on every backend (prompt rendering, the
context-length check, output cleaning, usage bookkeeping) live here, once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from backends.errors import (
    ConstraintUnavailableError,
    ContextLengthExceededError,
    InvalidModelEntryError,
    PromptRenderError,
)
from backends.placement import PLACEMENT_KEYS, check_placement
from backends.spec import ModelSpec, parse_context_size
from backends.text.cleaning import OutputCleaner
from backends.text.grammar import CompiledGrammar, GrammarCompiler, SequenceMatcher
from backends.text.prompting import ChatTemplate, choose_chat_template
from backends.text.reasoning import ReasoningFormat, answer_grammar, reasoning_format
from backends.weights.progress import LoadProgress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    """Server-wide settings a backend needs at load time; an entry's own keys take precedence. Each is a flag
    of ``clemproxy serve`` too (its help is here), with a ``CLEMPROXY_*`` variable."""

    context_size: int = field(
        default=4096,
        metadata={"help": "context window for entries without context_size; capped at the model's trained length"},
    )
    parallel: int = field(
        default=4,
        metadata={
            "help": "sequence slots of a model (llama.cpp or transformers), for entries without parallel: requests "
            "decoded together, each slot keeping its last dialogue's cache"
        },
    )
    threads: int = field(
        default=0,
        metadata={
            "help": "CPU threads for every local model together: the models generating share them (an entry's "
            "threads takes its own), torch's and llama.cpp's pools alike; 0: every core of this machine"
        },
    )
    repack_weights: str = field(
        default="auto",
        metadata={
            "help": "llama.cpp's repacked weight buffers (AMX, CPU_REPACK), for entries without repack_weights: "
            "'auto' uses them except on a CPU with AMX, whose kernels crash this llama.cpp on prompt batches "
            "(ggml-org/llama.cpp#20824); 'on' or 'off' always",
            "choices": ("auto", "on", "off"),
        },
    )
    convert_cache: str = field(
        default="",
        metadata={
            "help": "folder where transformers models read from a GGUF file (gguf_file) keep their converted "
            "weights, so that later loads skip the conversion; default: the user's cache directory "
            "(~/.cache/clemproxy/converted); 'none': convert on every load",
            "metavar": "PATH",
        },
    )
    convert_cache_max: int = field(
        default=0,
        metadata={
            "help": "size bound of the conversion cache, like 20G: the least recently used conversions that no "
            "loaded model uses are removed; 0: no bound",
            "metavar": "SIZE",
            "memory": True,
        },
    )

    def llama_threads(self) -> int:
        return self.threads if self.threads > 0 else os.cpu_count() or 1

    def convert_cache_root(self) -> Path | None:
        """Where converted GGUF checkpoints go; None when they are not kept. Unset, the folder comes from
        ``CLEMPROXY_CONVERT_CACHE`` (as the flag's variable) else the user's cache directory, read now."""
        from backends.weights.convert_cache import DISABLED, default_root

        chosen = self.convert_cache or os.environ.get("CLEMPROXY_CONVERT_CACHE", "")
        if chosen.strip().lower() == DISABLED:
            return None
        return Path(chosen).expanduser() if chosen else default_root()


@dataclass(frozen=True)
class GenerationParams:
    """Backend-neutral sampling settings (OpenAI semantics: temperature and top_p only)."""

    max_tokens: int | None = None  # None: as many as fit the context window
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False  # record each generated token's log probability in the outcome
    top_logprobs: int = 0  # and this many most likely alternatives (0-20)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence of a token
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    tools: tuple[Mapping[str, Any], ...] = ()  # OpenAI's tool objects, for the prompt (``backends.text.tools``)
    grammar: str | None = None  # what the output must match, in llguidance's format (``backends.text.grammar``)
    # The request's own registry entry, where it is a variant of the loaded one (``backends.registry.variants``):
    # its template, template language and cleaning keys. Empty: the loaded entry's.
    entry: Mapping[str, Any] = field(default_factory=dict)
    reasoning_budget: int | None = None  # tokens of reasoning at most; then the end marker is forced


@dataclass(frozen=True)
class PreparedPrompt:
    """A rendered, tokenised prompt that fits the context window with room for ``max_tokens``."""

    text: str
    token_ids: tuple[int, ...]
    max_tokens: int
    constraint: CompiledGrammar | None = None  # ``params.grammar`` compiled for this model's vocabulary
    reasoning: ReasoningFormat | None = None  # how the output marks reasoning apart from the answer, if it does

    def matcher(self) -> SequenceMatcher | None:
        """A fresh grammar state for one sequence generated from this prompt, when its output is constrained."""
        return self.constraint.matcher() if self.constraint is not None else None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability, and the most likely alternatives at its position (OpenAI's shape)."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


def token_logprob(logits: Any, token_id: int, top_n: int, token_bytes: Callable[[int], bytes]) -> TokenLogprob:
    """From one position's raw logits (a 1-D numpy array): the chosen token's log probability and the top ``top_n``.

    Log probabilities are of the model's own distribution, before temperature, top_p or penalties, as OpenAI's are.
    """
    import numpy as np

    values = np.asarray(logits, dtype=np.float64)
    shifted = values - values.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())

    def entry(index: int) -> tuple[str, float, tuple[int, ...]]:
        raw = token_bytes(index)
        return raw.decode("utf-8", errors="replace"), float(logprobs[index]), tuple(raw)

    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()
    if top_n > 0:
        best = np.argpartition(-logprobs, top_n - 1)[:top_n]
        top = tuple(entry(int(i)) for i in sorted(best, key=lambda i: -logprobs[i]))
    text, logprob, raw = entry(token_id)
    return TokenLogprob(text, logprob, raw, top)


@dataclass
class GenerationOutcome:
    """Filled in while a generation runs; read once it has finished (``logprobs`` also while it runs)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"  # "stop" (end of sequence or stop string) or "length"
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when asked for
    cached_tokens: int = 0  # of the prompt, taken from the cache of an earlier request instead of computed


class Model(ABC):
    """One registry entry's model: load it, then generate from it.

    A backend's facts are class attributes, read without loading anything: the registry checks an entry's
    ``mandatory_keys``, the model manager runs ``concurrency_of`` requests at once, the admin page asks
    ``gpu_available``. ``backends.catalog`` maps each backend name to its class.
    """

    backend_name: ClassVar[str]
    mandatory_keys: ClassVar[tuple[str, ...]]  # registry keys every entry of this backend must have
    default_concurrency: ClassVar[int] = 1  # generations at once, unless the entry sets ``concurrency``
    placement_keys: ClassVar[Mapping[str, Callable[[Any], bool]]] = PLACEMENT_KEYS  # what a load may override

    batches: ClassVar[bool] = False  # decodes its requests together in ``slots_of`` sequence slots
    remote: ClassVar[bool] = False  # another server generates: requests are forwarded, nothing loads here

    @classmethod
    def slots_of(cls, spec: Mapping[str, Any], options: LoadOptions) -> int:
        """Sequence slots of a batching backend: the entry's ``parallel``, else the server's ``--parallel``."""
        return int(spec.get("parallel") or options.parallel)

    @classmethod
    def concurrency_of(cls, spec: Mapping[str, Any], options: LoadOptions) -> int:
        """Requests at once: the entry's ``concurrency``, else a batching backend's slots, else the default."""
        configured = spec.get("concurrency")
        if isinstance(configured, int) and not isinstance(configured, bool) and configured > 0:
            return configured
        return cls.slots_of(spec, options) if cls.batches else cls.default_concurrency

    @classmethod
    def gpu_available(cls) -> bool:
        """Whether this backend can put weights on a GPU on this machine (imports the backend's library)."""
        return False

    @classmethod
    def gpu_names(cls) -> list[str]:
        """The GPUs this backend sees, by name, where it can tell."""
        return []

    @classmethod
    def check_placement(cls, override: Mapping[str, Any]) -> None:
        """Refuse (``InvalidPlacementError``) a load override this backend cannot honour."""
        check_placement(override, cls.placement_keys)

    def __init__(self, spec: ModelSpec, options: LoadOptions | None = None) -> None:
        self.spec = spec
        self.options = options or LoadOptions()
        self.chat_template: ChatTemplate | None = None  # the loaded entry's; a variant's comes from template_for
        self._own_templates: dict[str, str] = {}  # the model's own chat templates, "default" and any named ones
        self._special_tokens = ("", "")  # the text of its BOS and EOS tokens, for templates
        self._templates: dict[tuple[bool, str, str], ChatTemplate] = {}
        self.context_size: int = 0
        self.tokens_generated = 0  # over the model's lifetime, counted when each generation ends
        self._grammar: GrammarCompiler | None = None  # for this load; an unload sets it to None
        self._grammar_lock = threading.Lock()
        self.progress = LoadProgress()  # of its load, for the admin page; cancelling it stops the load
        # Called, from any thread, when the loaded model breaks for good (its worker process died), with why.
        self.on_failure: Callable[[str], None] | None = None

    @property
    def name(self) -> str:
        return str(self.spec["model_name"])

    @abstractmethod
    def load(self) -> None:
        """Fetch (if needed) and load the weights; sets ``chat_template`` and ``context_size``."""

    @abstractmethod
    def unload(self) -> None:
        """Release the weights."""

    @property
    @abstractmethod
    def is_loaded(self) -> bool: ...

    @abstractmethod
    def tokenize_prompt(self, text: str) -> list[int]:
        """Token ids of a rendered prompt, with exactly the special tokens the model expects."""

    @abstractmethod
    def generate_tokens(
        self, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event, outcome: GenerationOutcome
    ) -> Generator[str, None, None]:
        """Raw text pieces, one per generated token or so, stopping at end of sequence,
        ``prompt.max_tokens`` or ``cancel``; updates ``outcome`` as it goes."""

    def healthy(self) -> bool:
        """False once the loaded model can serve no more (its engine thread died)."""
        return True

    def set_threads(self, threads: int) -> None:
        """Decode with this many CPU threads from the next step on (the server's thread budget moved)."""
        del threads  # a backend without CPU threads of its own has nothing to set

    def context_window(self, trained: int | None) -> int:
        """The context size to enforce: the entry's ``context_size`` (the operator's call), else the server
        default, never more than the model was trained on. clembench writes ``""`` for a size it does not know:
        that is the default too."""
        explicit = self.spec.get("context_size")
        if explicit is not None and explicit != "":
            return parse_context_size(explicit)
        return min(self.options.context_size, trained) if trained else self.options.context_size

    def set_templates(self, own: Mapping[str, str], *, bos_token: str, eos_token: str) -> ChatTemplate:
        """After a load: the model's own chat templates (``"default"`` and named ones) and its special-token
        text; picks the loaded entry's template (``chat_template``) and returns it."""
        self._own_templates = {name: text for name, text in own.items() if text}
        self._special_tokens = (bos_token, eos_token)
        self._templates = {}
        self.chat_template = template = self.template_for(self.spec)
        return template

    def template_for(self, entry: Mapping[str, Any]) -> ChatTemplate:
        """The chat template an entry asks for (``premade_chat_template``, ``custom_chat_template``,
        ``chat_template_language``), built once per choice; a variant of the loaded entry may choose another."""
        custom = str(entry.get("custom_chat_template") or "")
        language = str(entry.get("chat_template_language") or "")
        key = (bool(entry.get("premade_chat_template")), custom, language)
        template = self._templates.get(key)
        if template is None:
            premade = self._own_templates.get(language or "default")
            if language and premade is None and key[0]:
                names = ", ".join(sorted(self._own_templates)) or "none"
                raise InvalidModelEntryError(
                    f"chat_template_language {language!r}: the model has no chat template of that name "
                    f"(its templates: {names})"
                )
            bos, eos = self._special_tokens
            template = self._templates[key] = choose_chat_template(entry, premade, bos_token=bos, eos_token=eos)
        return template

    def entry_of(self, params: GenerationParams) -> Mapping[str, Any]:
        """The registry entry a request's prompt and cleaning follow: its own (a variant), else the loaded one."""
        return params.entry or self.spec

    def special_token_text(self, found: str | None, registry_key: str) -> str:
        """BOS/EOS text for templates: the model's own token, else the entry's ``bos_string``/``eos_string``."""
        return found if found else str(self.spec.get(registry_key, ""))

    def load_info(self) -> dict[str, Any]:
        """What loading actually did (device, layers, context size...), for operators."""
        return {
            "context_size": self.context_size,
            "chat_template": self.chat_template.origin if self.chat_template else None,
        }

    def render_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] = (),
        entry: Mapping[str, Any] | None = None,
    ) -> str:
        if self.chat_template is None:
            raise RuntimeError(f"{self.name} is not loaded")
        entry = entry or self.spec
        template = self.template_for(entry)
        prefill = entry.get("cot_bypass")
        if not prefill:
            return template.render(messages, extra=template_kwargs, tools=tools)
        # clemcore's cot_bypass: the assistant turn starts with this text (an empty reasoning block), and the
        # model continues it, as transformers' continue_final_message renders it: up to the text's end.
        prefill = str(prefill)
        turn = [*messages, {"role": "assistant", "content": prefill}]
        rendered = template.render(turn, add_generation_prompt=False, extra=template_kwargs, tools=tools)
        at = rendered.rfind(prefill)
        if at < 0:
            raise PromptRenderError("cot_bypass: the chat template does not render the prefilled assistant text")
        return rendered[: at + len(prefill)]

    def grammar_compiler(self) -> GrammarCompiler:
        """The loaded model's vocabulary for constrained decoding, built on first use (about half a second) and
        kept until the model is unloaded."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = self._new_grammar_compiler()
            return self._grammar

    def _new_grammar_compiler(self) -> GrammarCompiler:
        """The backend's vocabulary, as llguidance takes it."""
        raise ConstraintUnavailableError(f"the {self.backend_name} backend cannot constrain its output")

    def prepare(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams) -> PreparedPrompt:
        """Render and tokenise the prompt and check it fits; raises ``ContextLengthExceededError``."""
        entry = self.entry_of(params)
        text = self.render_prompt(messages, params.template_kwargs, params.tools, entry)
        found = reasoning_format(entry, self.template_for(entry).source, text)
        if found is None:
            return self.prepare_text(text, params)
        # The answer is held to the grammar, not the reasoning before it; a budget ends the reasoning.
        params = dataclasses.replace(params, grammar=answer_grammar(params.grammar, found, params.reasoning_budget))
        return dataclasses.replace(self.prepare_text(text, params), reasoning=found)

    def prepare_text(self, text: str, params: GenerationParams) -> PreparedPrompt:
        """Tokenise a raw prompt (no chat template: legacy completions) and check it fits; compile its grammar."""
        token_ids = self.tokenize_prompt(text)
        if not token_ids:  # nothing to continue from: no backend can generate from an empty context
            raise PromptRenderError("The prompt is empty: it has no tokens to continue from")
        room = self.context_size - len(token_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if room <= 0 or max_tokens > room:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.context_size} tokens. However, you requested "
                f"{len(token_ids) + max(max_tokens, 0)} tokens ({len(token_ids)} in the prompt, "
                f"{max(max_tokens, 0)} in the completion). Please reduce the length of the prompt or completion.",
                prompt_tokens=len(token_ids),
                max_tokens=max_tokens,
                context_size=self.context_size,
            )
        constraint = self.grammar_compiler().compile(params.grammar) if params.grammar is not None else None
        return PreparedPrompt(text=text, token_ids=tuple(token_ids), max_tokens=max_tokens, constraint=constraint)

    def generate(
        self, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event, outcome: GenerationOutcome
    ) -> Iterator[str]:
        """Cleaned text deltas; their concatenation is the same whether read as a stream or whole."""
        entry = self.entry_of(params)
        cleaner = OutputCleaner(
            stop=params.stop,
            eos_to_cull=entry.get("eos_to_cull"),
            output_split_prefix=entry.get("output_split_prefix"),
        )
        outcome.prompt_tokens = len(prompt.token_ids)
        pieces = self.generate_tokens(prompt, params, cancel, outcome)
        try:
            for piece in pieces:
                delta = cleaner.feed(piece)
                if delta:
                    yield delta
                if cleaner.stopped:
                    outcome.finish_reason = "stop"
                    break
        finally:
            pieces.close()  # ends the backend's generation loop when we stop early
            self.tokens_generated += outcome.completion_tokens
        tail = cleaner.finish()
        if tail:
            yield tail
