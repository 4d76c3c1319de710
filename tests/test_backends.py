"""What must hold on every backend, on the real SmolLM2: the same prompt tokens, the same greedy answer,
and cancellation within a token."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from backends import GenerationOutcome, GenerationParams
from tests.support import COLORS, GREEDY, generate

CONVERSATIONS = {
    "user only": COLORS,
    "with system": [{"role": "system", "content": "You are terse."}, *COLORS],
    "multi-turn": [
        *COLORS,
        {"role": "assistant", "content": "1. Red\n2. Blue\n3. Green"},
        {"role": "user", "content": "And three fruits?"},
    ],
    "system and multi-turn, non-ASCII": [
        {"role": "system", "content": "Réponds en français. 🙂"},
        {"role": "user", "content": "Nenne drei Farben: Grün, Blau …"},
        {"role": "assistant", "content": "Rouge, vert, bleu."},
        {"role": "user", "content": "  Merci !\n\nEt trois fruits ?  "},
    ],
}

# The same model on each backend: llama.cpp on the GGUF, transformers on the GGUF and on its safetensors copy.
MODELS = ["smol_llamacpp", "smol_hf_gguf", "smol_hf"]


@pytest.fixture(params=MODELS)
def model(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("messages", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_prompt_token_ids_are_the_same_on_every_backend(
    smol_llamacpp: Any, smol_hf_gguf: Any, smol_hf: Any, messages: list[dict[str, str]]
) -> None:
    expected = smol_llamacpp.prepare(messages, GREEDY)
    for model in (smol_hf_gguf, smol_hf):
        prompt = model.prepare(messages, GREEDY)
        assert prompt.text == expected.text
        assert prompt.token_ids == expected.token_ids


def test_greedy_answer_and_usage(model: Any) -> None:
    text, outcome = generate(model)
    assert text == "1. Red\n2. Blue\n3. Green"  # no <|im_end|> or other special token leaks
    assert (outcome.finish_reason, outcome.prompt_tokens, outcome.completion_tokens) == ("stop", 34, 11)


def test_cancel_stops_generation_within_a_token(model: Any) -> None:
    params = GenerationParams(max_tokens=200, temperature=1.0, seed=1)
    messages = [{"role": "user", "content": "Write a long story about a dragon."}]
    cancel, outcome = threading.Event(), GenerationOutcome()
    pieces = model.generate_tokens(model.prepare(messages, params), params, cancel, outcome)
    for count, _ in enumerate(pieces, start=1):
        if count == 3:
            cancel.set()
    assert outcome.completion_tokens == 3
