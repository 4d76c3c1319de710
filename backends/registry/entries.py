"""The clembench model registry: reading, flattening and validating entries.

Entries come in clembench's two layouts: backend keys flat on the entry (the
layout the registry documentation describes) or nested under ``model_config``
(the layout current clembench registries use). Both become one flat
``ModelSpec``. Validation collects every problem of every entry at once; an
invalid entry is kept, with its problems, so that it can be shown and refused
by name rather than vanishing.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jinja2

from backends.catalog import BACKENDS
from backends.errors import InvalidModelEntryError, UnknownModelError, UnsupportedBackendError
from backends.openai_compatible import is_base_url
from backends.registry.keys import BY_KEY, unhonoured, unknown_keys
from backends.spec import ModelSpec
from backends.text.prompting import compile_template

logger = logging.getLogger(__name__)

REGISTRY_FILENAME = "model_registry.json"

# Backends clemproxy runs; each class names the keys its entries require (clembench's registry documentation).
SERVED_BACKENDS = frozenset(BACKENDS)

# Backends clembench knows that clemproxy does not run, and why: remote APIs, people, programs, and backends
# clemcore has since dropped. They are valid entries that this server does not serve, and never block the others.
OTHER_BACKENDS: dict[str, str] = {
    "openai": "a remote API (OpenAI's own): call it directly, or add an openai_compatible entry for it",
    "azure": "a remote API (Azure OpenAI): call it directly, or add an openai_compatible entry for it",
    "anthropic": "a remote API (Anthropic's)",
    "cohere": "a remote API (Cohere's)",
    "google": "a remote API (Google's)",
    "mistral": "a remote API (Mistral's)",
    "alephalpha": "a remote API (Aleph Alpha's)",
    "openrouter": "a remote API (OpenRouter): add an openai_compatible entry with its base_url",
    "huggingface_multimodal": (
        "clemcore's former multimodal backend; current clemcore writes these as huggingface_local entries with "
        "model_config.multimodal: true"
    ),
    "vllm": ("clemcore's former vLLM backend, since replaced by openai_compatible entries pointing at a vLLM server"),
    "slurk": "a chat room with people (slurk), not a model",
    "_player_human": "a person playing, not a model",
    "_player_programmed": "a programmed player, not a model",
}
CLEMBENCH_OTHER_BACKENDS = frozenset(OTHER_BACKENDS)

_GPU_CPU = ("gpu", "cpu")


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_str_or_str_list(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_layer_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= -1


def _is_context_size(value: Any) -> bool:
    if value is None or value == "":
        return True  # clembench's "not known": the model's own length, capped by --context-size
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value > 0
    return isinstance(value, str) and re.fullmatch(r"\s*\d+\s*[kKmM]?\s*", value) is not None


# Registry keys this server reads, with the type each must have.
KEY_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model_name": (_is_str, "a string"),
    "backend": (_is_str, "a string"),
    "huggingface_id": (_is_str, "a string (hub repo id or local directory)"),
    "filename": (_is_str, "a string (file name or glob)"),
    "additional_files": (_is_str_or_str_list, "a string or a list of strings"),
    "premade_chat_template": (_is_bool, "true or false"),
    "custom_chat_template": (_is_str, "a string (Jinja2 template)"),
    "eos_to_cull": (_is_str, "a string (Python regular expression)"),
    "output_split_prefix": (_is_str, "a string"),
    "requires_api_key": (_is_bool, "true or false"),
    "slow_tokenizer": (_is_bool, "true or false"),
    "bos_string": (_is_str, "a string"),
    "eos_string": (_is_str, "a string"),
    "execute_on": (lambda v: v in _GPU_CPU, '"gpu" or "cpu"'),
    "gpu_layers_offloaded": (_is_layer_count, "an integer >= -1 (-1 means all layers)"),
    "context_size": (_is_context_size, 'a positive integer, a size like "8k", or "" (not known)'),
    "gguf_file": (_is_str, "a string (GGUF file name)"),
    "python_package": (_is_str, "a string (name of an installed Python distribution)"),
    "concurrency": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "parallel": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64, "an integer from 1 to 64"),
    "kv_cache_size": (lambda v: v not in (None, "") and _is_context_size(v), 'a positive integer or a size like "16k"'),
    "threads": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "repack_weights": (_is_bool, "true or false"),
    "dtype": (lambda v: v in ("float32", "bfloat16", "float16"), '"float32", "bfloat16" or "float16"'),
    "temperature": (lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2"),
    "top_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    "model_id": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string (the name sent upstream)"),
    "base_url": (is_base_url, 'an http(s) URL such as "http://gpu-node:8000/v1"'),
    # clemcore 3.7's huggingface_local keys (backends.registry.keys says what clemproxy does with each)
    "trust_remote_code": (_is_bool, "true or false"),
    "attn_implementation": (_is_str, 'a string such as "sdpa", "eager" or "flash_attention_2"'),
    "load_in_8bit": (_is_bool, "true or false"),
    "load_in_4bit": (_is_bool, "true or false"),
    "peft_model": (lambda v: isinstance(v, str) and bool(v.strip()), "a string (hub repo id or local folder)"),
    "padding_side": (lambda v: isinstance(v, str) and v.lower() in ("left", "right"), '"left" or "right"'),
    "chat_template_kwargs": (lambda v: isinstance(v, dict), "an object of template variables"),
    "chat_template_language": (_is_str, "a string (the name of one of the tokenizer's chat templates)"),
    "multimodal": (_is_bool, "true or false"),
    "cot_output": (_is_bool, "true or false"),
    "cot_start_tag": (_is_str, "a string"),
    "cot_end_tag": (_is_str, "a string (Python regular expression)"),
    "cot_bypass": (_is_str, "a string (the prefilled start of the answer)"),
    "cot_effort": (_is_str, 'a string such as "low", "medium" or "high"'),
    "extra_body": (lambda v: isinstance(v, dict), "an object of request keys"),
    # clemproxy's: tokens of reasoning at most, for every request of the entry that sets none
    "reasoning_budget": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    # Ray Serve (clemproxy serve --ray): replicas of a deployed model, fixed or autoscaled.
    "replicas": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "autoscaling": (
        lambda v: (
            isinstance(v, dict)
            and set(v) <= {"min", "max"}
            and all(isinstance(v.get(k), int) and not isinstance(v.get(k), bool) for k in ("min", "max"))
            and 0 <= v["min"] <= v["max"]
            and v["max"] >= 1
        ),
        'an object {"min": M, "max": N} with 0 <= M <= N and N >= 1',
    ),
}


Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    severity: Severity
    message: str
    key: str | None = None

    def __str__(self) -> str:
        where = f"{self.key}: " if self.key else ""
        return f"{self.severity}: {where}{self.message}"


@dataclass(frozen=True)
class RegistryEntry:
    """One entry of one registry file, flattened, with everything wrong with it."""

    spec: ModelSpec
    source: str  # file path, or "<dict>" for entries not read from a file
    index: int  # position in its file
    problems: tuple[Problem, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        name = self.spec.get("model_name")
        return name if isinstance(name, str) else f"<entry {self.index}>"

    @property
    def backend(self) -> str | None:
        backend = self.spec.get("backend")
        return backend if isinstance(backend, str) else None

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    @property
    def is_valid(self) -> bool:
        return not self.errors

    @property
    def is_served(self) -> bool:
        """Valid, and for a backend this server runs."""
        return self.is_valid and self.backend in SERVED_BACKENDS

    @property
    def not_served_reason(self) -> str | None:
        """Why a valid entry of a backend clembench knows is not served here; None for a served one."""
        if self.backend in SERVED_BACKENDS or self.backend is None:
            return None
        return OTHER_BACKENDS.get(self.backend, "a backend clemproxy does not know")


def flatten_entry(entry: Mapping[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """Merge ``model_config`` into the entry's top level; a key set differently in both is an error."""
    flat = {k: v for k, v in entry.items() if k != "model_config"}
    problems: list[Problem] = []
    nested = entry.get("model_config")
    if nested is None:
        return flat, problems
    if not isinstance(nested, Mapping):
        problems.append(Problem("error", "must be an object holding backend keys", "model_config"))
        return flat, problems
    for key, value in nested.items():
        if key in flat and flat[key] != value:
            problems.append(
                Problem("error", f"set both on the entry ({flat[key]!r}) and in model_config ({value!r})", key)
            )
            continue
        flat[key] = value
    return flat, problems


def validate_entry(flat: Mapping[str, Any]) -> list[Problem]:
    """Every problem of one flattened entry."""
    problems: list[Problem] = []
    for key in ("model_name", "backend"):
        if key not in flat:
            problems.append(Problem("error", "missing (mandatory for every entry)", key))
    for key, value in flat.items():
        check = KEY_TYPES.get(key)
        if check is not None and not check[0](value):
            problems.append(Problem("error", f"must be {check[1]}, got {value!r}", key))
    if isinstance(flat.get("model_name"), str) and not flat["model_name"].strip():
        problems.append(Problem("error", "must not be empty", "model_name"))

    backend = flat.get("backend")
    if isinstance(backend, str):
        if backend in SERVED_BACKENDS:
            for key in BACKENDS[backend].mandatory_keys:
                if key not in flat:
                    problems.append(Problem("error", f"missing (mandatory for backend {backend})", key))
        elif backend not in CLEMBENCH_OTHER_BACKENDS:
            known = ", ".join(sorted(SERVED_BACKENDS | CLEMBENCH_OTHER_BACKENDS))
            problems.append(Problem("error", f"unknown backend {backend!r} (known: {known})", "backend"))

    pattern = flat.get("eos_to_cull")
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(Problem("error", f"is not a valid Python regular expression: {exc}", "eos_to_cull"))
        else:
            if re.search(r"(?:^|[^\\])\|", pattern) and re.search(r"[<>]", pattern):
                # clembench's documented pitfall: "<|im_end|>" unescaped means "<" or "im_end" or ">".
                problems.append(
                    Problem(
                        "warning",
                        f"{pattern!r} has an unescaped '|' next to a special-token-like string; it removes "
                        'each alternative separately. Escape it, e.g. "<\\\\|im_end\\\\|>" in JSON',
                        "eos_to_cull",
                    )
                )

    template = flat.get("custom_chat_template")
    if isinstance(template, str):
        try:
            compile_template(template)
        except jinja2.TemplateSyntaxError as exc:
            problems.append(
                Problem(
                    "error",
                    f"is not a valid Jinja2 template: {exc.message} (line {exc.lineno})",
                    "custom_chat_template",
                )
            )

    if (
        backend in SERVED_BACKENDS
        and not BACKENDS[backend].remote
        and flat.get("premade_chat_template") is False
        and not flat.get("custom_chat_template")
    ):
        problems.append(
            Problem(
                "warning",
                "premade_chat_template is false and there is no custom_chat_template: "
                "the generic fallback template will be used",
                "custom_chat_template",
            )
        )
    if backend in SERVED_BACKENDS:
        problems += key_notes(flat, backend)
    if "replicas" in flat and "autoscaling" in flat:
        problems.append(Problem("error", "set either replicas or autoscaling, not both", "replicas"))
    if "execute_on" in flat and "gpu_layers_offloaded" in flat:
        problems.append(
            Problem(
                "warning", "ignored because execute_on is set (execute_on takes precedence)", "gpu_layers_offloaded"
            )
        )
    return problems


def key_notes(flat: Mapping[str, Any], backend: str) -> list[Problem]:
    """Warnings for the keys of a served entry that do nothing here: clembench keys clemproxy does not honour,
    keys of another backend, and keys nobody reads."""
    notes = [Problem("warning", what, key) for key, what in unhonoured(flat, backend)]
    for key in flat:
        use = BY_KEY.get(key)
        if use is not None and backend not in use.backends and key not in KEY_TYPES_SHARED:
            notes.append(Problem("warning", f"read by clembench's {', '.join(use.backends)} backend only", key))
    for key in unknown_keys(flat, [*KEY_TYPES, "lookup_source", "model_config"]):
        notes.append(Problem("warning", "not a key clembench or clemproxy reads; ignored", key))
    return notes


# Keys of the key table that clemproxy reads on every backend it serves, whatever clembench does.
KEY_TYPES_SHARED = frozenset(
    {"bos_string", "eos_string", "chat_template_kwargs", "chat_template_language", "context_size"}
)


def parse_entries(data: Any, source: str) -> tuple[list[RegistryEntry], list[Problem]]:
    """Entries of one registry document, plus problems of the document itself."""
    if isinstance(data, Mapping):
        data = [data]  # clembench accepts a single entry object too
    if not isinstance(data, list):
        return [], [Problem("error", f"a registry must be a JSON list of entries, got {type(data).__name__}")]
    entries: list[RegistryEntry] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(data):
        if not isinstance(raw, Mapping):
            problem = Problem("error", f"an entry must be a JSON object, got {type(raw).__name__}")
            entries.append(RegistryEntry(ModelSpec(), source, index, (problem,), {}))
            continue
        flat, problems = flatten_entry(raw)
        problems += validate_entry(flat)
        name = flat.get("model_name")
        if isinstance(name, str):
            if name in seen:
                # clembench's rule: the first entry with a name wins; a later one is shadowed, not an error.
                shadowed = f"shadowed by entry {seen[name]}, which has the same name and wins"
                problems.append(Problem("warning", shadowed, "model_name"))
            else:
                seen[name] = index
        flat.setdefault("lookup_source", source)
        entries.append(RegistryEntry(ModelSpec.from_dict(flat), source, index, tuple(problems), dict(raw)))
    return entries, []


class RegistryFileError(Exception):
    """A registry file that cannot be read at all (missing, not JSON, not a list)."""


def read_registry_file(path: Path) -> list[RegistryEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryFileError(f"{path}: cannot read registry file: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryFileError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    entries, problems = parse_entries(data, str(path))
    if problems:
        raise RegistryFileError(f"{path}: {problems[0].message}")
    return entries


def bundled_registry_path() -> Path:
    """The registry shipped with clemproxy.

    A wheel carries it inside the ``backends`` package; a source checkout
    (editable install) has it at the repository's top level.
    """
    packaged = resources.files("backends").joinpath(REGISTRY_FILENAME)
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / REGISTRY_FILENAME


def registry_sources(registries: Iterable[Path] = (), cwd: Path | None = None) -> list[Path]:
    """Registry files in lookup order: each given one, else ``./model_registry.json``; then the bundled one."""
    given = [Path(p) for p in registries]
    if not given:
        local = (cwd or Path.cwd()) / REGISTRY_FILENAME
        if local.is_file():
            given = [local]
    ordered: list[Path] = []
    for path in [*given, bundled_registry_path()]:
        if not any(_same_file(path, seen) for seen in ordered):
            ordered.append(path)
    return ordered


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


class ModelRegistry:
    """All entries of all sources, in lookup order; the first entry with a name wins."""

    def __init__(self, entries: Iterable[RegistryEntry], sources: Iterable[Path] = ()) -> None:
        self.entries: list[RegistryEntry] = list(entries)
        self.sources: list[Path] = list(sources)
        self._first: dict[str, RegistryEntry] = {}
        for entry in self.entries:
            name = entry.spec.get("model_name")
            if isinstance(name, str):
                self._first.setdefault(name, entry)

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> ModelRegistry:
        paths = list(paths)
        entries: list[RegistryEntry] = []
        for path in paths:
            entries += read_registry_file(path)
        return cls(entries, paths)

    @classmethod
    def from_sources(cls, registries: Iterable[Path] = (), cwd: Path | None = None) -> ModelRegistry:
        return cls.from_files(registry_sources(registries, cwd))

    @classmethod
    def from_list(cls, entries: list[Any], source: str = "<dict>") -> ModelRegistry:
        parsed, problems = parse_entries(entries, source)
        if problems:
            raise RegistryFileError(problems[0].message)
        return cls(parsed)

    def reload(self) -> None:
        """Read the source files again, after one was edited: the entries, and which one each name finds."""
        fresh = ModelRegistry.from_files(self.sources)
        self.entries, self._first = fresh.entries, fresh._first

    def __iter__(self) -> Iterator[RegistryEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, model_name: str) -> RegistryEntry:
        """The first entry named ``model_name``; ``UnknownModelError`` if there is none."""
        try:
            return self._first[model_name]
        except KeyError:
            raise UnknownModelError(
                f"The model '{model_name}' does not exist in this server's model registry"
            ) from None

    def is_shadowed(self, entry: RegistryEntry) -> bool:
        """True for an entry that an earlier one with the same name hides."""
        return self._first.get(entry.name) is not entry

    def resolve(self, model: str | Mapping[str, Any] | ModelSpec) -> ModelSpec:
        """A servable spec for a name (or a partial spec unified with its entry), or a clear error."""
        selector = ModelSpec.from_name(model) if isinstance(model, str) else ModelSpec.from_dict(model)
        entry = self.lookup(selector["model_name"])
        if entry.errors:
            details = "; ".join(str(p) for p in entry.errors)
            raise InvalidModelEntryError(f"The registry entry for '{entry.name}' is invalid: {details}")
        if entry.backend not in SERVED_BACKENDS:
            raise UnsupportedBackendError(
                f"The model '{entry.name}' uses backend '{entry.backend}', which clemproxy does not serve "
                f"({entry.not_served_reason}; it serves: {', '.join(sorted(SERVED_BACKENDS))})"
            )
        try:
            return selector.unify(entry.spec)
        except ValueError as exc:
            raise InvalidModelEntryError(
                f"The request does not agree with the registry entry for '{entry.name}': {exc}"
            ) from exc

    def served(self) -> list[RegistryEntry]:
        """The entries a request can reach and this server can run, in registry order."""
        return [e for e in self.entries if not self.is_shadowed(e) and e.is_served]
