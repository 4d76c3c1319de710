"""Variants: registry entries over the same loaded model.

clembench writes one entry per way of prompting a model: ``gpt-oss-20b``, ``gpt-oss-20b-low`` (another
reasoning effort) and ``gpt-oss-20b-nothink`` (another template and a prefill) name the same weights. Entries
whose keys agree except for the ones a request reads (``backends.registry.keys``, ``per_request``) share one
load: one engine, one KV cache, one slot pool. Each request still follows its own entry's template, template
arguments, cleaning and reasoning keys, which travel with it (``GenerationParams.entry``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from backends.registry.keys import PER_REQUEST_KEYS


def load_key(spec: Mapping[str, Any], remote: bool = False) -> str:
    """What a load depends on: the entry without its per-request keys. Entries with the same key share a load.
    An entry another server serves (``remote``) never shares: its name is its key."""
    if remote:
        return json.dumps({"model_name": spec.get("model_name")})
    kept = {key: value for key, value in spec.items() if key not in PER_REQUEST_KEYS}
    return json.dumps(kept, sort_keys=True, default=str)


def request_entry(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The per-request keys of an entry, as a request carries them to the model (possibly a worker process)."""
    return {key: value for key, value in spec.items() if key in PER_REQUEST_KEYS}


def template_arguments(
    spec: Mapping[str, Any], requested: Mapping[str, Any] | None, reasoning_effort: str | None = None
) -> dict[str, Any]:
    """The template's variables: the entry's ``chat_template_kwargs`` and its ``cot_effort`` (as clemcore, the
    template's ``reasoning_effort`` unless the kwargs set one), then the request's own, key by key, and its
    ``reasoning_effort``."""
    defaults = spec.get("chat_template_kwargs")
    merged = dict(defaults) if isinstance(defaults, Mapping) else {}
    if spec.get("cot_effort"):
        merged.setdefault("reasoning_effort", spec["cot_effort"])
    merged.update(requested or {})
    if reasoning_effort is not None:
        merged["reasoning_effort"] = reasoning_effort
    return merged
