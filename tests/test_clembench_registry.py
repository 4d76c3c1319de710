"""clembench's own registry, served as clembench means it.

The real 230-entry registry of late 2025 (``tests/data``) is read the way clembench reads it: every local entry
servable, duplicates shadowed, remote backends listed as not served, every key named. A registry written like
clembench's (both layouts, every key clemcore's local backends read) answers through a real server and the
openai SDK; variants of the demo model share one load; a LoRA adapter made from the demo model in the test
answers as peft's own generation does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from backends import ModelRegistry
from backends.errors import ModelLoadError
from backends.registry.keys import KEYS
from proxy.cli import check
from proxy.settings import Settings
from tests.support import (
    CHATML_VIA_SPECIAL_TOKENS,
    COLORS,
    RunningServer,
    loaded,
    smol_entry,
    smol_hf_entry,
    write_registry,
)
from tests.support.models import ENDLESS, WORDS
from tests.support.servers import StreamInThread, wait_until

ROOT = Path(__file__).resolve().parents[1]
CLEMBENCH_2025 = ROOT / "tests" / "data" / "clembench_model_registry_2025-12.json"
LOCAL = ("huggingface_local", "llamacpp")

ABOUT = {
    "release_date": "2024-11-01",
    "open_weight": True,
    "parameters": "135M",
    "languages": ["en"],
    "license": {"name": "Apache 2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
}


def nested(entry: dict[str, Any], **about: Any) -> dict[str, Any]:
    """An entry in current clembench's layout: the backend keys under ``model_config``, descriptions on top."""
    top = ("model_name", "backend", "huggingface_id")
    return {
        **{k: entry[k] for k in top},
        **ABOUT,
        "context_size": "",
        **about,
        "model_config": {k: v for k, v in entry.items() if k not in top},
    }


# --- the real registry ---------------------------------------------------------------------------------


def test_clembench_registry_of_2025_checks_clean_and_every_local_entry_is_servable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert check([CLEMBENCH_2025]) == 0
    printed = capsys.readouterr().out
    registry = ModelRegistry.from_files([CLEMBENCH_2025])
    local = [e for e in registry if e.backend in LOCAL]
    assert len(registry) == 230 and len(local) == 119
    assert all(e.is_valid for e in local), [(e.name, [str(p) for p in e.errors]) for e in local if not e.is_valid]
    shadowed = [e for e in registry if registry.is_shadowed(e)]
    assert sorted(e.name for e in shadowed) == [
        "EuroLLM-9B-Instruct",
        "Mixtral-8x7B-Instruct-v0.1",
        "OLMo-2-1124-13B-Instruct",
    ]
    assert all(any("shadowed by entry" in str(p) for p in e.warnings) for e in shadowed)
    # Every local entry a run can reach is served, the llamacpp ones with context_size "" included.
    served = {e.name for e in registry.served()}
    assert {e.name for e in local if not registry.is_shadowed(e)} <= served
    assert sum(1 for e in local if e.backend == "llamacpp" and e.spec.get("context_size") == "") == 11
    # Remote backends are valid entries, listed as not served here with why.
    for backend in ("openai", "anthropic", "huggingface_multimodal", "vllm", "slurk"):
        assert re.search(rf"^    {backend}: \d+ entries — \S", printed, re.M), printed[-2000:]
    errors_at, warnings_at = printed.find("  errors:"), printed.find("  warnings:")
    assert errors_at == -1 and warnings_at > 0
    assert "padding_side: no effect here" in printed and "cot_output" not in printed  # reasoning keys: honoured


def test_a_remote_entry_of_that_registry_is_refused_by_name_with_why() -> None:
    registry = ModelRegistry.from_files([CLEMBENCH_2025])
    with pytest.raises(Exception, match=r"which clemproxy does not serve .*remote API"):
        registry.resolve("gpt-4o-2024-08-06")


def test_the_readme_key_table_names_every_key() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## What clemproxy does with each clembench key") :]
    table = table[: table.index("\n## ", 1)]
    rows = {m[1] for m in re.finditer(r"^\| `([a-z_0-9]+)` \|", table, re.M)}
    assert {use.key for use in KEYS} <= rows, sorted({use.key for use in KEYS} - rows)


# --- a registry written like clembench's ---------------------------------------------------------------

EVERY_KEY = {
    "model_name": "every-key",
    "backend": "huggingface_local",
    "huggingface_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "premade_chat_template": True,
    "eos_to_cull": "<\\|im_end\\|>",
    "trust_remote_code": True,
    "attn_implementation": "sdpa",
    "load_in_8bit": False,
    "load_in_4bit": False,
    "peft_model": "someone/smollm2-lora",
    "padding_side": "left",
    "chat_template_kwargs": {"enable_thinking": False},
    "chat_template_language": "default",
    "multimodal": True,
    "cot_output": True,
    "cot_start_tag": "<think>",
    "cot_end_tag": "</think>",
    "cot_bypass": "<think></think>",
    "cot_effort": "low",
}


def clembench_shaped(checkpoint: Path) -> list[dict[str, Any]]:
    return [
        nested(smol_entry("cb-smol-gguf"), context_size=""),  # clembench's "not known"
        {**smol_hf_entry("cb-smol-hf", checkpoint), **ABOUT, "context_size": "8k"},  # the flat layout
        nested(smol_entry("cb-smol-gguf", eos_to_cull="Red")),  # a duplicate: shadowed, never served
        {"model_name": "claude", "backend": "anthropic", "model_id": "claude-x", **ABOUT, "model_config": {}},
        nested(EVERY_KEY),
    ]


@pytest.fixture(scope="module")
def clembench_server(tmp_path_factory: pytest.TempPathFactory, smol_checkpoint: Path) -> Iterator[RunningServer]:
    path = write_registry(
        tmp_path_factory.mktemp("clembench") / "model_registry.json", clembench_shaped(smol_checkpoint)
    )
    with RunningServer(ModelRegistry.from_files([path]), Settings.of(threads_follow_load=False)) as server:
        yield server


def test_a_clembench_shaped_registry_checks_with_the_right_warnings(
    tmp_path: Path, smol_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_registry(tmp_path / "model_registry.json", clembench_shaped(smol_checkpoint))
    assert check([path]) == 0
    printed = capsys.readouterr().out
    assert "5 entries: 3 served here, 1 of backends not served here, 0 invalid, 1 shadowed" in printed
    every = printed[printed.index("every-key") :]
    for key in ("padding_side", "multimodal"):
        assert f"warning: {key}:" in every, key
    for honoured in ("trust_remote_code", "attn_implementation", "peft_model", "chat_template_kwargs", "cot_output"):
        assert f"warning: {honoured}:" not in every, honoured
    assert "shadowed by entry 0" in printed
    assert "anthropic: 1 entries — a remote API" in printed


def test_the_local_entries_of_a_clembench_shaped_registry_answer_through_the_sdk(
    clembench_server: RunningServer,
) -> None:
    client = openai.OpenAI(base_url=f"{clembench_server.base_url}/v1", api_key="unused", max_retries=0)
    for name in ("cb-smol-gguf", "cb-smol-hf"):
        answer = client.chat.completions.create(model=name, messages=COLORS, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content, name
    cards = {card.id: card.model_dump() for card in client.models.list().data}
    assert set(cards) == {"cb-smol-gguf", "cb-smol-hf", "every-key"}
    assert cards["cb-smol-hf"]["parameters"] == "135M" and cards["cb-smol-hf"]["context_size"] == "8k"
    assert cards["cb-smol-gguf"]["license"]["name"] == "Apache 2.0"
    assert "context_size" not in cards["cb-smol-gguf"]  # "" says nothing
    # The entry clembench calls "not known" gets the model's own length, capped by --context-size.
    rows = rows_of(clembench_server)
    assert rows["cb-smol-gguf"]["loaded"]["context_size"] == Settings().models.context_size
    assert rows["cb-smol-hf"]["loaded"]["context_size"] == 8192
    assert {item["key"] for item in rows["every-key"]["not_honoured"]} == {"padding_side", "multimodal"}
    assert rows["every-key"]["trust_remote_code"] is True and rows["every-key"]["multimodal"] is True
    page = httpx.get(f"{clembench_server.base_url}/admin").text
    assert "135M parameters · 8k context · Apache 2.0 · en · released 2024-11-01" in page
    assert "own code (trust_remote_code)" in page


@pytest.mark.parametrize("key", ["load_in_8bit", "load_in_4bit"])
def test_quantised_loading_without_a_gpu_is_a_load_error_naming_the_key(smol_checkpoint: Path, key: str) -> None:
    entry = smol_hf_entry("quantised", smol_checkpoint, **{key: True})
    needs = rf"^{key}: bitsandbytes quantisation needs every layer on a CUDA GPU"
    with pytest.raises(ModelLoadError, match=needs), loaded(entry):
        pass


# --- variants share one load ---------------------------------------------------------------------------

PLAIN = CHATML_VIA_SPECIAL_TOKENS  # with an answer_prefix template argument
PREFILLED = "{{ bos_token }}system\nYou answer in one line, in the voice of a pirate.{{ eos_token }}\n" + PLAIN


@pytest.fixture(scope="module")
def variant_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    entries = [
        smol_entry(
            "smol-kwargs",
            premade_chat_template=False,
            custom_chat_template=PLAIN,
            chat_template_kwargs={"answer_prefix": "The three colors are"},
        ),
        smol_entry(
            "smol-prefilled",
            premade_chat_template=False,
            custom_chat_template=PREFILLED,
            chat_template_kwargs={"answer_prefix": "Arr,"},
        ),
    ]
    path = write_registry(tmp_path_factory.mktemp("variants") / "model_registry.json", entries)
    with RunningServer(ModelRegistry.from_files([path]), Settings.of(threads_follow_load=False)) as server:
        yield server


def rows_of(server: RunningServer) -> dict[str, Any]:
    """The admin API's rows by name (of a shadowed duplicate, the one that wins), each with the whole answer."""
    body = httpx.get(f"{server.base_url}/admin/api/models", timeout=30).json()
    return {m["name"]: {**m, "_body": body} for m in reversed(body["models"])}


def test_two_variants_share_one_load_and_answer_each_by_its_own_template(variant_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{variant_server.base_url}/v1", api_key="unused", max_retries=0)
    first = client.chat.completions.create(model="smol-kwargs", messages=COLORS, max_tokens=16, temperature=0)
    rows = rows_of(variant_server)
    assert rows["smol-kwargs"]["state"] == "loaded"
    assert rows["smol-prefilled"]["state"] == "loaded"  # loaded by the other entry: it shares the model
    assert rows["smol-prefilled"]["shares_with"] == ["smol-kwargs"]
    second = client.chat.completions.create(model="smol-prefilled", messages=COLORS, max_tokens=16, temperature=0)
    rows = rows_of(variant_server)
    manager = variant_server.services.manager
    assert len(manager.distinct_slots()) == 1  # one engine, one KV cache, one slot pool
    pid = rows["smol-kwargs"]["loaded"]["worker"]["pid"]
    assert rows["smol-prefilled"]["loaded"]["worker"]["pid"] == pid
    body = rows["smol-kwargs"]["_body"]
    assert body["loaded_bytes"] == rows["smol-kwargs"]["loaded"]["model_bytes"]  # memory counted once
    assert sorted(body["loaded"]) == ["smol-kwargs", "smol-prefilled"]
    # Each request followed its own entry: the prefilled system prompt is in the second prompt only.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert first.choices[0].message.content != second.choices[0].message.content
    # A request's own chat_template_kwargs override the entry's, key by key.
    own = client.chat.completions.create(
        model="smol-kwargs",
        messages=COLORS,
        max_tokens=16,
        temperature=0,
        extra_body={"chat_template_kwargs": {"answer_prefix": "Arr,"}},
    )
    assert own.usage.prompt_tokens != first.usage.prompt_tokens


def test_variants_interleave_in_one_batch(variant_server: RunningServer) -> None:
    long = StreamInThread(
        variant_server.base_url, "long", model="smol-kwargs", max_tokens=300, messages=WORDS, response_format=ENDLESS
    )
    wait_until(lambda: len(long.lines) > 3, "the first variant streams")
    client = openai.OpenAI(base_url=f"{variant_server.base_url}/v1", api_key="unused", max_retries=0)
    short = client.chat.completions.create(model="smol-prefilled", messages=COLORS, max_tokens=12, temperature=0)
    assert short.choices[0].finish_reason == "length"
    # The short request of one variant began and ended while the other's was generating on the same engine.
    assert long.thread.is_alive()
    long.join()
    assert long.finish_reasons == ["length"]
    assert len(variant_server.services.manager.distinct_slots()) == 1


def test_unloading_one_variant_unloads_the_shared_model_and_says_so(variant_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{variant_server.base_url}/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model="smol-prefilled", messages=COLORS, max_tokens=4, temperature=0)
    page = httpx.get(f"{variant_server.base_url}/admin").text
    assert "Unloading smol-kwargs also unloads smol-prefilled: they share one loaded model." in page
    answer = httpx.post(f"{variant_server.base_url}/admin/api/models/smol-prefilled/unload", timeout=60).json()
    assert answer["state"] == "unloaded" and answer["shares_with"] == ["smol-kwargs"]
    assert rows_of(variant_server)["smol-kwargs"]["state"] == "unloaded"


# --- a LoRA adapter -----------------------------------------------------------------------------------


def make_adapter(checkpoint: Path, target: Path) -> None:
    """A LoRA adapter over the demo model, with weights that change its greedy answer (peft's own code)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(target))


def peft_generation(checkpoint: Path, adapter: Path, max_tokens: int) -> tuple[str, str]:
    """peft's own greedy generation of COLORS, with and without the adapter: the decoded new tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    ids = tokenizer.apply_chat_template(COLORS, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    arguments = {"max_new_tokens": max_tokens, "do_sample": False}
    with torch.no_grad():
        plain = base.generate(**ids, **arguments)
        adapted = PeftModel.from_pretrained(base, str(adapter)).generate(**ids, **arguments)
    start = ids["input_ids"].shape[1]
    return (
        tokenizer.decode(plain[0][start:], skip_special_tokens=True),
        tokenizer.decode(adapted[0][start:], skip_special_tokens=True),
    )


def test_a_lora_adapter_answers_as_peft_does(tmp_path: Path, smol_checkpoint: Path) -> None:
    adapter = tmp_path / "smol-lora"
    make_adapter(smol_checkpoint, adapter)
    plain, adapted = peft_generation(smol_checkpoint, adapter, max_tokens=12)
    assert plain != adapted  # the adapter changes the greedy answer
    entries = [
        smol_hf_entry("smol-hf-base", smol_checkpoint),
        smol_hf_entry("smol-hf-lora", smol_checkpoint, peft_model="./smol-lora"),
    ]
    path = write_registry(tmp_path / "model_registry.json", entries)
    with RunningServer(ModelRegistry.from_files([path]), Settings.of(threads_follow_load=False)) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)

        def ask(name: str) -> str:
            answer = client.chat.completions.create(model=name, messages=COLORS, max_tokens=12, temperature=0)
            return answer.choices[0].message.content or ""

        assert ask("smol-hf-lora").strip() == adapted.strip()
        assert ask("smol-hf-base").strip() == plain.strip()
        rows = rows_of(server)
        assert rows["smol-hf-lora"]["loaded"]["adapter"] == str(adapter.resolve())
        assert rows["smol-hf-lora"]["adapter"] == "./smol-lora"
        assert len(server.services.manager.distinct_slots()) == 2  # the adapter is part of what a load shares


def test_a_missing_adapter_is_a_clear_load_error(tmp_path: Path, smol_checkpoint: Path) -> None:
    entry = smol_hf_entry("no-adapter", smol_checkpoint, peft_model="./nowhere")
    (tmp_path / "nowhere").mkdir()
    with (
        pytest.raises(ModelLoadError, match=r"peft_model: the folder .*nowhere has no adapter_config\.json"),
        loaded(entry, tmp_path),
    ):
        pass


def test_an_adapter_on_the_hub_offline_and_uncached_fails_clearly(smol_checkpoint: Path) -> None:
    entry = smol_hf_entry("hub-adapter", smol_checkpoint, peft_model="nobody/not-cached-lora")
    with (
        pytest.raises(ModelLoadError, match="the hub is not reachable and it is not in the local Hugging Face cache"),
        loaded(entry),
    ):
        pass


def test_extra_body_of_the_clembench_file_is_a_valid_key() -> None:
    registry = ModelRegistry.from_files([CLEMBENCH_2025])
    with_extra = [e for e in registry if "extra_body" in e.spec]
    assert with_extra and all(e.is_valid for e in with_extra)
    assert all(isinstance(e.spec["extra_body"], dict) for e in with_extra)
    assert json.dumps(with_extra[0].spec["extra_body"])


# --- trust_remote_code and chat_template_language: what is fetched, which template is used -----------------


def test_remote_code_and_named_templates_are_fetched_with_a_checkpoint() -> None:
    from backends.weights.files import checkpoint_files

    listing = [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "modeling_custom.py",
        "additional_chat_templates/DE.jinja",
        "original/params.json",
    ]
    assert checkpoint_files(listing, "org/m") == [
        "config.json",
        "tokenizer.json",
        "additional_chat_templates/DE.jinja",
        "model.safetensors",
    ]
    assert "modeling_custom.py" in checkpoint_files(listing, "org/m", code=True)


def with_named_template(checkpoint: Path, target: Path, name: str, template: str) -> Path:
    """A copy of a checkpoint (files linked) whose tokenizer has one more, named, chat template."""
    target.mkdir()
    for file in checkpoint.iterdir():
        (target / file.name).symlink_to(file)
    (target / "additional_chat_templates").mkdir()
    (target / "additional_chat_templates" / f"{name}.jinja").write_text(template, encoding="utf-8")
    return target


def test_chat_template_language_picks_the_tokenizers_named_template(tmp_path: Path, smol_checkpoint: Path) -> None:
    from backends.errors import InvalidModelEntryError
    from tests.support.models import GREEDY

    checkpoint = with_named_template(smol_checkpoint, tmp_path / "named", "pirate", PREFILLED)
    entry = smol_hf_entry("named", checkpoint, chat_template_language="pirate")
    with loaded(entry) as model:
        pirate = model.prepare(COLORS, GREEDY).text
        assert pirate.startswith("<|im_start|>system\nYou answer in one line, in the voice of a pirate.")
        # The same loaded model, asked by a variant without the language: the default template.
        plain = model.prepare(COLORS, replace(GREEDY, entry={**entry, "chat_template_language": ""})).text
        assert "pirate" not in plain and "SmolLM" in plain
        with pytest.raises(InvalidModelEntryError, match=r"no chat template of that name .*default, pirate"):
            model.prepare(COLORS, replace(GREEDY, entry={**entry, "chat_template_language": "klingon"}))
