"""The transformers engine over a real server with the real model (SmolLM2 as a transformers checkpoint, float32)
and the openai SDK: requests decoded together in slots, each keeping its own settings; every dialogue's cache
kept and found again, shared rules computed once; cancellation and unload in the middle of a batch."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from backends import LoadOptions, ModelRegistry
from backends.huggingface.model import HuggingfaceLocalModel
from proxy.settings import Settings
from tests.support import COUNTING, RunningServer, StreamInThread, smol_hf_entry, wait_until, write_registry

HF = "smol-hf-engine"
BF16 = "smol-hf-bf16"
UNBATCHED = "smol-hf-sliding"  # the same weights, with a config that says its attention slides: not batched
PROMPTS = [
    "Name three colors.",
    "Count from 1 to 20, separated by commas.",
    "Write a short poem about the sea.",
    "List the days of the week.",
]
# About 700 tokens of game rules, the same for every instance of the game (as clembench's prompts are).
RULES = "You are playing a word game. " + " ".join(
    f"Rule {n}: when the other player says a word starting with the letter {chr(97 + n % 26)}, you answer with "
    f"a word of {3 + n % 5} letters that starts with the letter after it."
    for n in range(1, 26)
)


@pytest.fixture(scope="module")
def engine_server(tmp_path_factory: pytest.TempPathFactory, smol_checkpoint: Path) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("hf-engine")
    sliding = folder / "sliding"
    sliding.mkdir()
    for file in smol_checkpoint.iterdir():
        (sliding / file.name).symlink_to(file)
    config = json.loads((smol_checkpoint / "config.json").read_text())
    (sliding / "config.json").unlink()
    (sliding / "config.json").write_text(json.dumps({**config, "sliding_window": 64, "use_sliding_window": True}))
    entries = [
        smol_hf_entry(HF, smol_checkpoint),
        smol_hf_entry(BF16, smol_checkpoint, dtype="bfloat16", parallel=2),
        smol_hf_entry(UNBATCHED, sliding),
    ]
    path = write_registry(folder / "model_registry.json", entries)
    with RunningServer(ModelRegistry.from_files([path]), Settings.of(unload_timeout=0.5)) as server:
        yield server
    shutil.rmtree(sliding)


def sdk(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def async_sdk(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def info(server: RunningServer, model: str) -> dict[str, Any]:
    loaded = server.services.manager.loaded(model)
    assert loaded is not None
    return loaded.load_info()


def slots_in_use(server: RunningServer, model: str) -> int:
    """0 while the model is still loading."""
    loaded = server.services.manager.loaded(model)
    return int(loaded.load_info().get("slots_in_use", 0)) if loaded is not None else 0


def ask(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def streamed(client: openai.AsyncOpenAI, prompt: str, **kwargs: Any) -> tuple[str, float, float]:
    """The text of one streamed completion, when its first token came and when it ended."""
    stream = await client.chat.completions.create(messages=ask(prompt), stream=True, **kwargs)
    text, first = "", 0.0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.monotonic()
            text += chunk.choices[0].delta.content
    return text, first, time.monotonic()


async def test_concurrent_greedy_streams_each_equal_their_text_alone(engine_server: RunningServer) -> None:
    client = async_sdk(engine_server)
    kwargs: dict[str, Any] = {"model": HF, "temperature": 0, "max_tokens": 40}
    alone = []
    for prompt in PROMPTS:
        answer = await client.chat.completions.create(messages=ask(prompt), **kwargs)
        alone.append(answer.choices[0].message.content)
    together = await asyncio.gather(*(streamed(client, prompt, **kwargs) for prompt in PROMPTS))
    assert [text for text, _, _ in together] == alone
    # Decoded together, not one after another: every stream had started before the first one ended.
    assert max(first for _, first, _ in together) < min(end for _, _, end in together)
    assert info(engine_server, HF)["mean_batch"] > 1
    await client.close()


async def test_per_request_settings_hold_in_a_batch(engine_server: RunningServer) -> None:
    """In one batch: a seed gives the same sample twice, temperature 0 is the greedy text, logprobs come per
    token, a frequency penalty changes a repetitive answer, and n choices differ from each other."""
    client = async_sdk(engine_server)
    counting = "Count from 1 to 20, separated by commas."
    greedy = await client.chat.completions.create(model=HF, messages=ask(counting), temperature=0, max_tokens=30)
    sampled: dict[str, Any] = {"model": HF, "messages": ask(counting), "temperature": 1.0, "max_tokens": 30}
    seeded_a, seeded_b, cold, with_logprobs, penalised = await asyncio.gather(
        client.chat.completions.create(seed=7, **sampled),
        client.chat.completions.create(seed=7, **sampled),
        client.chat.completions.create(model=HF, messages=ask(counting), temperature=0, max_tokens=30),
        client.chat.completions.create(
            model=HF, messages=ask(counting), temperature=0, max_tokens=30, logprobs=True, top_logprobs=3
        ),
        client.chat.completions.create(
            model=HF, messages=ask(counting), temperature=0, max_tokens=30, frequency_penalty=2.0
        ),
    )
    assert seeded_a.choices[0].message.content == seeded_b.choices[0].message.content
    assert cold.choices[0].message.content == greedy.choices[0].message.content
    entries = with_logprobs.choices[0].logprobs.content
    assert len(entries) == with_logprobs.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in entries)
    assert "".join(e.token for e in entries) == greedy.choices[0].message.content
    assert all(e.logprob <= 0 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)
    assert penalised.choices[0].message.content != greedy.choices[0].message.content
    several = await client.chat.completions.create(n=3, seed=11, **sampled)
    assert len({choice.message.content for choice in several.choices}) > 1
    await client.close()


def dialogue_turn(client: openai.OpenAI, history: list[dict[str, str]], say: str) -> Any:
    history.append({"role": "user", "content": say})
    answer = client.chat.completions.create(model=HF, messages=history, temperature=0, max_tokens=10)
    history.append({"role": "assistant", "content": answer.choices[0].message.content})
    return answer.usage


def test_interleaved_dialogues_find_their_history_and_share_the_rules(engine_server: RunningServer) -> None:
    client = sdk(engine_server)
    dialogues: list[list[dict[str, str]]] = [[{"role": "system", "content": RULES}] for _ in range(3)]
    first = [
        dialogue_turn(client, history, f"Player {i}: my first word is apple.") for i, history in enumerate(dialogues)
    ]
    assert first[0].prompt_tokens > 500
    for usage in first[1:]:  # the rules were computed once, by the first dialogue, and copied
        assert usage.prompt_tokens_details.cached_tokens >= first[0].prompt_tokens - 20
    previous = first
    for turn in range(2, 4):  # three dialogues take turns on four slots: each finds its own history again
        later = [dialogue_turn(client, h, f"Turn {turn}: banana.") for h in dialogues]
        for before, usage in zip(previous, later, strict=True):
            assert usage.prompt_tokens_details.cached_tokens >= before.prompt_tokens
        previous = later
    history = dialogues[0]  # and streamed, in the usage chunk
    history.append({"role": "user", "content": "Last turn: cherry."})
    chunks = list(
        client.chat.completions.create(
            model=HF, messages=history, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= previous[0].prompt_tokens
    stats = info(engine_server, HF)
    assert stats["slots"] == 4 and stats["prefix_cache_hit_rate"] > 0.5


def test_a_prompt_from_the_cache_answers_as_one_computed_anew(engine_server: RunningServer) -> None:
    """Longer than a prefill chunk, computed in chunks, then found in the cache: the same greedy answer."""
    client = sdk(engine_server)
    messages = [{"role": "system", "content": RULES}, {"role": "user", "content": "Which rule is number 7?"}]
    answer = client.chat.completions.create(model=HF, messages=messages, temperature=0, max_tokens=20)
    assert answer.usage.prompt_tokens > 2 * info(engine_server, HF)["prefill_chunk"]
    again = client.chat.completions.create(model=HF, messages=messages, temperature=0, max_tokens=20)
    assert again.usage.prompt_tokens_details.cached_tokens == answer.usage.prompt_tokens - 1
    assert again.choices[0].message.content == answer.choices[0].message.content


def test_cancelling_one_request_of_a_batch_leaves_the_others_unchanged(engine_server: RunningServer) -> None:
    client = sdk(engine_server)
    messages = [ask(p) for p in PROMPTS[1:]]
    alone = [
        client.chat.completions.create(model=HF, messages=m, temperature=0, max_tokens=40).choices[0].message.content
        for m in messages
    ]
    others = [StreamInThread(engine_server.base_url, f"k{i}", model=HF, messages=m) for i, m in enumerate(messages)]
    body = {"model": HF, "messages": COUNTING, "temperature": 0, "max_tokens": 300, "stream": True}
    with httpx.stream("POST", f"{engine_server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        chunks = 0
        for line in response.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 4:
                break  # the client leaves mid-stream, while the others generate
    texts = []
    for stream in others:
        stream.join()
        texts.append("".join(e["choices"][0]["delta"].get("content") or "" for e in stream.events if e["choices"]))
    assert texts == alone
    slot = engine_server.services.manager.slot(HF)
    wait_until(lambda: slot.queue.admitted == 0, "the abandoned request has ended")
    wait_until(lambda: info(engine_server, HF)["slots_in_use"] == 0, "its slot is free")
    again = client.chat.completions.create(model=HF, messages=messages[0], temperature=0, max_tokens=40)
    assert again.choices[0].message.content == alone[0]  # the model takes the next request, and answers right


def test_unload_during_a_batch_ends_every_request_with_the_error_event(engine_server: RunningServer) -> None:
    client = sdk(engine_server)
    client.chat.completions.create(model=HF, messages=COUNTING, max_tokens=1)
    streams = [StreamInThread(engine_server.base_url, f"u{i}", model=HF, max_tokens=400) for i in range(3)]
    wait_until(lambda: slots_in_use(engine_server, HF) == 3, "three slots generate")
    unloaded = httpx.post(f"{engine_server.base_url}/admin/api/models/{HF}/unload", timeout=60).json()
    assert unloaded["state"] == "unloaded"
    for stream in streams:
        stream.join()
        assert stream.lines[-1] == "data: [DONE]"
        assert json.loads(stream.lines[-2][6:])["error"]["code"] == "model_unloaded"
    answer = client.chat.completions.create(model=HF, messages=COUNTING, temperature=0, max_tokens=5)
    assert answer.choices[0].message.content  # loaded again, and answering


def test_batch_capacity_in_flight_and_reuse_show_in_the_admin_api(engine_server: RunningServer) -> None:
    streams = [StreamInThread(engine_server.base_url, f"a{i}", model=HF, max_tokens=200) for i in range(2)]
    wait_until(lambda: slots_in_use(engine_server, HF) == 2, "two slots generate")
    view = httpx.get(f"{engine_server.base_url}/admin/api/models/{HF}", timeout=30).json()
    loaded = view["loaded"]
    assert view["concurrency"] == 4 and loaded["slots"] == 4 and loaded["slots_in_use"] == 2
    assert loaded["batching"] == "engine" and loaded["requests_waiting"] == 0
    assert len(loaded["slot_cached_tokens"]) == 4 and loaded["kv_cache_bytes"] > 0
    assert "prefix_cache_hit_rate" in loaded and loaded["requests_total"] >= 2
    page = httpx.get(f"{engine_server.base_url}/admin", timeout=30).text
    assert "slots 2/4 in use" in page and "sequences decoded a step" in page
    for stream in streams:
        stream.join()


def test_bfloat16_is_opt_in_per_entry_and_batches_too(engine_server: RunningServer) -> None:
    client = sdk(engine_server)
    answers = [StreamInThread(engine_server.base_url, f"b{i}", model=BF16, max_tokens=20) for i in range(2)]
    for stream in answers:
        assert stream.join().finish_reasons == ["length"]
    stats = info(engine_server, BF16)
    assert stats["dtype"] == "bfloat16" and stats["slots"] == 2 and stats["batching"] == "engine"
    answer = client.chat.completions.create(model=BF16, messages=ask(PROMPTS[0]), temperature=0, max_tokens=20)
    assert "Red" in (answer.choices[0].message.content or "")


def test_a_model_the_engine_cannot_batch_is_served_one_request_at_a_time(engine_server: RunningServer) -> None:
    client = sdk(engine_server)
    answer = client.chat.completions.create(model=UNBATCHED, messages=ask(PROMPTS[0]), temperature=0, max_tokens=20)
    reference = client.chat.completions.create(model=HF, messages=ask(PROMPTS[0]), temperature=0, max_tokens=20)
    assert answer.choices[0].message.content == reference.choices[0].message.content  # the window is not reached
    stats = info(engine_server, UNBATCHED)
    assert stats["batching"] == "one request at a time" and "slots" not in stats
    assert any("sliding window of 64 tokens" in w for w in stats["warnings"])


def test_concurrency_is_the_batch_capacity() -> None:
    options = LoadOptions(parallel=6)
    assert HuggingfaceLocalModel.concurrency_of({}, options) == 6
    assert HuggingfaceLocalModel.concurrency_of({"parallel": 2}, options) == 2
    assert HuggingfaceLocalModel.concurrency_of({"parallel": 2, "concurrency": 1}, options) == 1


def test_dtype_is_validated_in_the_registry(tmp_path: Path, smol_checkpoint: Path) -> None:
    path = write_registry(tmp_path / "model_registry.json", [smol_hf_entry("odd", smol_checkpoint, dtype="int4")])
    problems = [str(p) for p in ModelRegistry.from_files([path]).entries[0].problems]
    assert problems == ['error: dtype: must be "float32", "bfloat16" or "float16", got \'int4\'']
