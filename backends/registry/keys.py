"""Every key clembench's registry entries carry, what clembench does with it and what clemproxy does.

One table, read three ways: ``clemproxy check`` and the admin row name the keys of an entry that clemproxy does
not honour (with why), the README's key table is checked against it (``tests/test_registry_keys.py``), and the
variants of one model share one load when they differ only in keys this table marks ``per_request``.

Sources: clemcore 3.7's ``huggingface_local_api.py``, ``llamacpp_api.py``, ``openai_api.py`` (the
``openai_compatible`` backend builds on it) and ``model_registry.py``; clembench's registry of late 2025.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

LOCAL = ("huggingface_local", "llamacpp")
HF = ("huggingface_local",)
LLAMA = ("llamacpp",)
ALL = ("huggingface_local", "llamacpp", "openai_compatible")

# honoured: clemproxy does what clembench does (or more); no_effect: read, and has nothing to change here;
# not_honoured: read by clembench, ignored by clemproxy (named wherever the entry is shown); descriptive: about
# the model, shown, never changes what it generates.
Status = Literal["honoured", "no_effect", "not_honoured", "descriptive"]


@dataclass(frozen=True)
class KeyUse:
    key: str
    backends: tuple[str, ...]
    clembench: str
    clemproxy: str
    status: Status = "honoured"
    per_request: bool = False  # a variant's own: entries differing only in these share one loaded model


KEYS: tuple[KeyUse, ...] = (
    # --- on every entry ---
    KeyUse("model_name", ALL, "the name a run asks for; the first entry with it wins", "the same", per_request=True),
    KeyUse("backend", ALL, "which backend runs the model", "the same; other backends are listed as not served"),
    KeyUse("release_date", ALL, "descriptive", "shown on `/v1/models` and the admin page", "descriptive", True),
    KeyUse("open_weight", ALL, "descriptive", "shown on `/v1/models` and the admin page", "descriptive", True),
    KeyUse("parameters", ALL, "descriptive", "shown on `/v1/models` and the admin page", "descriptive", True),
    KeyUse("languages", ALL, "descriptive", "shown on `/v1/models` and the admin page", "descriptive", True),
    KeyUse("license", ALL, "descriptive", "shown on `/v1/models` and the admin page", "descriptive", True),
    KeyUse(
        "context_size",
        ALL,
        'descriptive (`huggingface_local` reads it only where the model\'s config has no length); `""` means not known',
        "the context window each request gets (the entry's word goes); "
        '`""` or `null`: the model\'s own length, capped by `--context-size`',
        per_request=False,
    ),
    # --- both local backends ---
    KeyUse("huggingface_id", LOCAL, "hub repo id of the weights", "hub repo id, or a local folder"),
    KeyUse(
        "premade_chat_template",
        LOCAL,
        "the model's own chat template, else `custom_chat_template`",
        "the same (a variant may choose differently from the entry it shares a load with)",
        per_request=True,
    ),
    KeyUse("custom_chat_template", LOCAL, "the entry's Jinja2 template", "the same", per_request=True),
    KeyUse("eos_to_cull", LOCAL, "regular expression removed from every output", "the same", per_request=True),
    KeyUse(
        "output_split_prefix",
        LOCAL,
        "only the output after its last occurrence is kept",
        "the same",
        per_request=True,
    ),
    KeyUse(
        "requires_api_key",
        LOCAL,
        "hub token from `key.json`",
        "token from `key.json` or `HF_TOKEN`; never logged",
    ),
    KeyUse(
        "execute_on",
        LOCAL,
        "`gpu`: every layer on the GPU, `cpu`: none",
        "the same (transformers: GPU 0 or the CPU)",
    ),
    KeyUse("gpu_layers_offloaded", LOCAL, "layers on the GPU when `execute_on` is absent", "the same"),
    KeyUse(
        "bos_string",
        LOCAL,
        "`llamacpp`: the template's `bos_token` where the file has none",
        "the same, on both backends",
    ),
    KeyUse(
        "eos_string",
        LOCAL,
        "`llamacpp`: the template's `eos_token` where the file has none",
        "the same, on both backends",
    ),
    # --- llama.cpp ---
    KeyUse("filename", LLAMA, "glob of the GGUF file in the repo", "the same; not exactly one match is an error"),
    KeyUse("additional_files", LLAMA, "the other shards of a split GGUF", "the same"),
    # --- transformers ---
    KeyUse(
        "slow_tokenizer",
        HF,
        "`use_fast=False`",
        "the SentencePiece tokenizer from `tokenizer.model` (transformers 5 has no slow tokenizers); "
        "without one the fast tokenizer, with a load warning",
    ),
    KeyUse(
        "trust_remote_code",
        HF,
        "lets transformers run the repo's own model code",
        "passed to transformers (config, tokenizer, weights); off unless the entry says `true`; shown on the admin row",
    ),
    KeyUse("attn_implementation", HF, "passed to `from_pretrained`", "passed to `from_pretrained`"),
    KeyUse(
        "load_in_8bit",
        HF,
        "bitsandbytes 8-bit weights",
        "bitsandbytes 8-bit weights on a GPU; without a GPU (or bitsandbytes) a load error naming the key",
    ),
    KeyUse(
        "load_in_4bit",
        HF,
        "bitsandbytes 4-bit weights",
        "bitsandbytes 4-bit weights on a GPU; without a GPU (or bitsandbytes) a load error naming the key",
    ),
    KeyUse(
        "peft_model",
        HF,
        "a LoRA (PEFT) adapter, hub id or folder, on top of the weights",
        "the same, merged into the weights at load (no adapter cost per token); part of what a load shares",
    ),
    KeyUse(
        "padding_side",
        HF,
        "the tokenizer's padding side for its batches",
        "no effect: clemproxy's engines never pad (every sequence has its own cache row and positions)",
        "no_effect",
    ),
    KeyUse(
        "chat_template_kwargs",
        HF,
        "extra template variables for every prompt of the entry",
        "the same, on both backends; a request's own `chat_template_kwargs` override them key by key",
        per_request=True,
    ),
    KeyUse(
        "chat_template_language",
        HF,
        "picks one of the tokenizer's named chat templates (`chat_template=` of `apply_chat_template`)",
        "the same; a GGUF's named templates (`tokenizer.chat_template.NAME`) too",
        per_request=True,
    ),
    KeyUse(
        "multimodal",
        HF,
        "loads a vision-language model with its processor",
        "accepted and shown; image input is not served yet, the model is loaded for text",
        "not_honoured",
    ),
    KeyUse(
        "cot_output",
        HF,
        "the output holds reasoning: split at `cot_end_tag`, reasoning logged apart; no token bound",
        "the same split, both backends, streamed too: the reasoning in `reasoning_content`, the answer in "
        "`content`; `max_tokens` counts both (OpenAI's reading), not only the answer",
        per_request=True,
    ),
    KeyUse("cot_start_tag", HF, "removed from the reasoning", "the same", per_request=True),
    KeyUse(
        "cot_end_tag",
        HF,
        "regular expression between reasoning and answer",
        "the same (its first match ends the reasoning)",
        per_request=True,
    ),
    KeyUse(
        "cot_bypass",
        HF,
        "an assistant message prefilled with this text, which the model continues",
        "the same, both backends: the prompt ends with the text, and the model answers at once",
        per_request=True,
    ),
    KeyUse(
        "cot_effort",
        HF,
        "`reasoning_effort` for the template (gpt-oss), unless `chat_template_kwargs` set it",
        "the same; a request's `reasoning_effort` overrides it",
        per_request=True,
    ),
    # --- openai_compatible ---
    KeyUse("model_id", ("openai_compatible",), "the model name sent upstream", "the same"),
    KeyUse("base_url", ("openai_compatible",), "the upstream server", "the same"),
    KeyUse(
        "extra_body",
        ("openai_compatible",),
        "keys merged into every request's body",
        "merged into every forwarded body; the request's own keys win",
        per_request=True,
    ),
)

BY_KEY: dict[str, KeyUse] = {use.key: use for use in KEYS}

# Keys of clemproxy's own, on top of clembench's (the README's other table); a variant's own where marked.
CLEMPROXY_PER_REQUEST = frozenset({"temperature", "top_p", "lookup_source", "reasoning_budget"})

PER_REQUEST_KEYS = frozenset({use.key for use in KEYS if use.per_request}) | CLEMPROXY_PER_REQUEST

DESCRIPTIVE_KEYS = ("release_date", "open_weight", "parameters", "languages", "license", "context_size")


def unhonoured(spec: Mapping[str, Any], backend: str | None) -> list[tuple[str, str]]:
    """The entry's keys that clembench reads and clemproxy does not act on, each with what clemproxy does
    ("not honoured: ..." or "no effect here: ...")."""
    named: list[tuple[str, str]] = []
    for key, value in spec.items():
        use = BY_KEY.get(key)
        if use is None or use.status not in ("not_honoured", "no_effect") or backend not in use.backends:
            continue
        if value in (False, None, "", {}, []):
            continue  # switched off: nothing is ignored
        prefix = "not honoured" if use.status == "not_honoured" else "no effect here"
        named.append((key, f"{prefix}: {use.clemproxy.removeprefix('no effect: ')}"))
    return named


def unknown_keys(spec: Mapping[str, Any], known: Iterable[str]) -> list[str]:
    """Keys no clembench backend and no clemproxy setting reads (a typo, or a key of a newer clembench)."""
    everything = set(BY_KEY) | set(known)
    return sorted(key for key in spec if key not in everything)
