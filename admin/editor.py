"""The admin page's registry editor: one entry as a form of its common keys plus the rest as JSON, and back.

An entry keeps its layout: a key it had under ``model_config`` goes back there, every other key it had stays
where it was and in its order; a new entry is flat. Problems found on save are shown next to their field, or
next to the JSON of the other keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backends.registry.entries import Problem

BACKEND_CHOICES = ("llamacpp", "huggingface_local", "openai_compatible")


@dataclass(frozen=True)
class Field:
    key: str
    label: str
    kind: str = "text"  # text, number, select
    choices: tuple[str, ...] = ()
    hint: str = ""


FIELDS = (
    Field("model_name", "Name", hint="what requests put in model"),
    Field("backend", "Backend", "select", BACKEND_CHOICES),
    Field("huggingface_id", "Hugging Face id or folder", hint="org/repo, or a local directory"),
    Field("filename", "File (llama.cpp)", hint="a glob matching one GGUF file"),
    Field("gguf_file", "GGUF file (transformers)"),
    Field("python_package", "Python package with the weights"),
    Field("premade_chat_template", "Model's own chat template", "select", ("", "true", "false")),
    Field("eos_to_cull", "eos_to_cull", hint="a Python regular expression"),
    Field("context_size", "Context size", hint='4096, or "8k"'),
    Field("parallel", "Slots (parallel)", "number"),
    Field("execute_on", "Execute on", "select", ("", "gpu", "cpu")),
    Field("model_id", "Upstream model id (openai_compatible)"),
    Field("base_url", "Upstream base URL (openai_compatible)"),
)
KEYS = tuple(f.key for f in FIELDS)
OTHER = "other"  # the form field of the other keys, as JSON


@dataclass
class EntryForm:
    values: dict[str, str]  # each common key's text in the form
    other: str  # the other keys, as JSON
    original: str = ""  # the name of the entry being edited; "" for a new one
    version: str = ""  # the file version the edit started from
    errors: dict[str, list[str]] = field(default_factory=dict)  # by field (or OTHER), what is wrong with it
    nested: tuple[str, ...] = ()  # common keys the entry keeps under model_config

    @classmethod
    def of_entry(cls, entry: Mapping[str, Any], original: str, version: str) -> EntryForm:
        nested_config = entry.get("model_config")
        nested = dict(nested_config) if isinstance(nested_config, Mapping) else {}
        values: dict[str, str] = {}
        other = {k: v for k, v in entry.items() if k not in KEYS}
        for key in KEYS:
            where = entry if key in entry else nested
            if key in where:
                value = where[key]
                values[key] = json.dumps(value) if isinstance(value, bool) else str(value)
        if "model_config" in other:
            rest = {k: v for k, v in nested.items() if k not in KEYS}
            if rest:
                other["model_config"] = rest
            else:
                del other["model_config"]
        in_config = tuple(k for k in KEYS if k in nested and k not in entry)
        return cls(values, json.dumps(other, indent=2) if other else "", original, version, nested=in_config)

    @classmethod
    def of_form(cls, form: Mapping[str, Any]) -> EntryForm:
        values = {key: str(form.get(key) or "").strip() for key in KEYS}
        nested = tuple(k for k in str(form.get("nested") or "").split(",") if k in KEYS)
        return cls(
            values,
            str(form.get(OTHER) or ""),
            str(form.get("original") or ""),
            str(form.get("version") or ""),
            nested=nested,
        )

    @property
    def name(self) -> str:
        return self.values.get("model_name", "")

    def entry(self) -> dict[str, Any] | None:
        """The entry the form describes; None (with ``errors`` filled in) when the form itself is malformed."""
        try:
            other = json.loads(self.other) if self.other.strip() else {}
        except json.JSONDecodeError as exc:
            self.errors[OTHER] = [f"not valid JSON: {exc.msg} (line {exc.lineno})"]
            return None
        if not isinstance(other, dict):
            self.errors[OTHER] = ["must be a JSON object of the entry's other keys"]
            return None
        entry: dict[str, Any] = {}
        for key in KEYS:  # the common keys first, in the form's order, for a new entry
            text = self.values.get(key, "")
            if text == "" or key in self.nested:
                continue
            entry[key] = typed(key, text)
        entry.update(other)
        nested = [k for k in self.nested if self.values.get(k)]
        if nested:
            config = dict(entry.get("model_config") or {})
            config.update({k: typed(k, self.values[k]) for k in nested})
            entry["model_config"] = config
        return entry

    def show(self, problems: tuple[Problem, ...]) -> None:
        for problem in problems:
            where = problem.key if problem.key in KEYS else OTHER
            text = (
                problem.message if problem.key in KEYS or problem.key is None else f"{problem.key}: {problem.message}"
            )
            self.errors.setdefault(where, []).append(text)


def typed(key: str, text: str) -> Any:
    """A form's text as the registry wants it: true/false, whole numbers, else the text."""
    if key == "premade_chat_template":
        return text == "true"
    if key in ("parallel", "context_size") and text.isdigit():
        return int(text)
    return text
