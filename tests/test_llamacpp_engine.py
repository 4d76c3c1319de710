"""The llama.cpp engine over a real server with the real model and the openai SDK: requests decoded together
in slots, each dialogue's cache kept and found again, shared rules computed once, cancellation, unload, long
prompts in chunks, and a full KV cache."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from backends import GenerationParams, ModelRegistry
from proxy.settings import Settings
from tests.support import (
    COUNTING,
    SMOL,
    RunningServer,
    StreamInThread,
    in_process_llama,
    smol_entry,
    wait_until,
    write_registry,
)

SMALL_KV = "smol-small-kv"  # two slots sharing a KV cache too small for both requests at once
SOLO = "smol-solo"  # one slot, for what the engine should produce alone
EIGHT = "smol-eight"  # more slots than the event loop's executor has threads (cores + 4)
PROMPTS = [
    "Name three colors.",
    "Count from 1 to 20, separated by commas.",
    "Write a short poem about the sea.",
    "List the days of the week.",
]
# About 1,400 tokens of game rules, the same for every instance of the game (as clembench's prompts are).
RULES = "You are playing a word game. " + " ".join(
    f"Rule {n}: when the other player says a word starting with the letter {chr(97 + n % 26)}, you answer with "
    f"a word of {3 + n % 5} letters that starts with the letter after it, and you never repeat a word."
    for n in range(1, 46)
)


@pytest.fixture(scope="module")
def engine_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    entries = [
        smol_entry(),
        smol_entry(SOLO, parallel=1),
        smol_entry(SMALL_KV, parallel=2, context_size=512, kv_cache_size=512),
        smol_entry(EIGHT, parallel=8, context_size=512),
    ]
    path = write_registry(tmp_path_factory.mktemp("engine") / "model_registry.json", entries)
    with RunningServer(ModelRegistry.from_files([path]), Settings.of(unload_timeout=0.5)) as server:
        yield server


def sdk(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def info(server: RunningServer, model: str) -> dict[str, Any]:
    loaded = server.services.manager.loaded(model)
    assert loaded is not None
    return loaded.load_info()


# Decoding several tokens at once (other sequences' tokens, a prompt chunk) computes some matrix products with
# llamafile's tinyBLAS instead of ggml's one-row dot product (here the Q8_0 output layer), which moves log
# probabilities by up to about 0.12. Greedy texts are the same unless the model is nearly undecided: where one
# differs from the other, the two likeliest tokens must have been this close.
NEAR_TIE = 0.25


def same_or_split_at_a_near_tie(entries: list[Any], other: list[str]) -> bool:
    """True when ``other`` is the same tokens as the logprob ``entries``; False when it differs at a near tie;
    an assertion error when it differs where the model was sure."""
    tokens = [e.token for e in entries]
    if tokens == other:
        return True
    at = next((i for i, (a, b) in enumerate(zip(tokens, other, strict=False)) if a != b), min(len(tokens), len(other)))
    gap = entries[at].top_logprobs[0].logprob - entries[at].top_logprobs[1].logprob if at < len(entries) else 0.0
    assert gap < NEAR_TIE, f"{''.join(tokens)!r} became {''.join(other)!r} at token {at}, where the gap was {gap:.3f}"
    return False


async def test_concurrent_streams_each_equal_their_text_alone(engine_server: RunningServer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{engine_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    kwargs: dict[str, Any] = {"model": SMOL, "temperature": 0, "max_tokens": 48, "logprobs": True, "top_logprobs": 2}
    alone = []
    for prompt in PROMPTS:
        answer = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kwargs)
        alone.append(answer.choices[0].logprobs.content)

    async def streamed(prompt: str) -> tuple[list[Any], float, float]:
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], stream=True, **kwargs
        )
        entries: list[Any] = []
        first = 0.0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
                first = first or time.monotonic()
                entries += chunk.choices[0].logprobs.content
        return entries, first, time.monotonic()

    together = await asyncio.gather(*(streamed(prompt) for prompt in PROMPTS))
    identical = [
        same_or_split_at_a_near_tie(solo, [e.token for e in batched])
        for solo, (batched, _, _) in zip(alone, together, strict=True)
    ]
    assert sum(identical) >= 1
    # Decoded together, not one after another: every stream had started before the first one ended.
    assert max(first for _, first, _ in together) < min(end for _, _, end in together)
    await client.close()


def dialogue_turn(client: openai.OpenAI, history: list[dict[str, str]], say: str) -> Any:
    history.append({"role": "user", "content": say})
    answer = client.chat.completions.create(model=SMOL, messages=history, temperature=0, max_tokens=12)
    history.append({"role": "assistant", "content": answer.choices[0].message.content})
    return answer.usage


def test_interleaved_dialogues_find_their_history_and_share_the_rules(engine_server: RunningServer) -> None:
    client = sdk(engine_server)
    dialogues: list[list[dict[str, str]]] = [[{"role": "system", "content": RULES}] for _ in range(3)]
    first = [
        dialogue_turn(client, history, f"Player {i}: my first word is apple.") for i, history in enumerate(dialogues)
    ]
    assert first[0].prompt_tokens > 1000
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
            model=SMOL, messages=history, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= previous[0].prompt_tokens
    stats = info(engine_server, SMOL)
    assert stats["slots"] == 4 and stats["prefix_cache_hit_rate"] > 0


def test_a_cancelled_stream_frees_its_slot_and_the_next_request_is_right(engine_server: RunningServer) -> None:
    client = sdk(engine_server)
    expected = client.chat.completions.create(model=SOLO, messages=COUNTING, temperature=0, max_tokens=30)
    body = {"model": SOLO, "messages": COUNTING, "temperature": 0, "max_tokens": 300, "stream": True}
    with httpx.stream("POST", f"{engine_server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        chunks = 0
        for line in response.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 4:
                break  # the client leaves mid-stream
    slot = engine_server.services.manager.slot(SOLO)
    wait_until(lambda: slot.queue.admitted == 0, "the abandoned request has ended")
    wait_until(lambda: info(engine_server, SOLO)["slots_in_use"] == 0, "its slot is free")
    again = client.chat.completions.create(model=SOLO, messages=COUNTING, temperature=0, max_tokens=30)
    assert again.choices[0].message.content == expected.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the slot kept the prompt it had computed


def test_a_prompt_longer_than_a_batch_is_decoded_in_chunks(engine_server: RunningServer) -> None:
    """Chunk by chunk, then the answer: the greedy text llama-cpp-python gives in-process for the same tokens
    (what a user would otherwise run), but for a near tie; and the same again from the cache."""
    client = sdk(engine_server)
    messages = [{"role": "system", "content": RULES}, {"role": "user", "content": "Which rule is number 7?"}]
    kwargs: dict[str, Any] = {"temperature": 0, "max_tokens": 24, "logprobs": True, "top_logprobs": 2}
    answer = client.chat.completions.create(model=SOLO, messages=messages, **kwargs)
    assert answer.usage.prompt_tokens > 2 * info(engine_server, SOLO)["n_batch"]
    model: Any = engine_server.services.manager.loaded(SOLO)
    prompt = model.prepare(messages, GenerationParams(max_tokens=24, temperature=0))
    reference = in_process_llama(n_ctx=4096)
    tokens: list[int] = []
    for token in reference.generate(prompt.token_ids, temp=0, top_k=0, min_p=0.0, repeat_penalty=1.0):
        if token == reference.token_eos() or len(tokens) == 24:
            break
        tokens.append(token)
    pieces = [reference.detokenize([t], prev_tokens=tokens[:i]).decode(errors="replace") for i, t in enumerate(tokens)]
    reference.close()
    same_or_split_at_a_near_tie(answer.choices[0].logprobs.content, pieces)
    again = client.chat.completions.create(model=SOLO, messages=messages, **kwargs)
    assert again.usage.prompt_tokens_details.cached_tokens == answer.usage.prompt_tokens - 1
    assert again.choices[0].message.content == answer.choices[0].message.content


def test_eight_slots_generate_at_once(engine_server: RunningServer) -> None:
    """Every slot serves: a generation has a thread of its own, so eight of them do not wait for the event loop's
    few executor threads (nor keep a ninth request from tokenising its prompt)."""
    streams = [StreamInThread(engine_server.base_url, f"e{i}", model=EIGHT, max_tokens=200) for i in range(8)]
    wait_until(lambda: engine_server.services.manager.loaded(EIGHT) is not None, "the model is loaded")
    wait_until(lambda: info(engine_server, EIGHT)["slots_in_use"] == 8, "all eight slots generate")
    answer = sdk(engine_server).chat.completions.create(model=SMOL, messages=COUNTING, temperature=0, max_tokens=3)
    assert answer.choices[0].finish_reason == "length"  # another model answers meanwhile
    for stream in streams:
        assert stream.join().finish_reasons == ["length"]


def test_a_full_kv_cache_ends_one_request_clearly_and_the_server_goes_on(engine_server: RunningServer) -> None:
    streams = [StreamInThread(engine_server.base_url, f"s{i}", model=SMALL_KV, max_tokens=300) for i in range(2)]
    for stream in streams:
        stream.join()
    ends = []
    for stream in streams:
        assert stream.status == 200 and stream.lines[-1] == "data: [DONE]"
        last = stream.events[-1]
        ends.append(last["error"]["code"] if "error" in last else stream.finish_reasons[-1])
    assert sorted(ends) == ["kv_cache_full", "length"], ends  # one ends with the error, the other finishes
    assert info(engine_server, SMALL_KV)["kv_cache_full_events"] >= 1
    answer = sdk(engine_server).chat.completions.create(model=SMALL_KV, messages=COUNTING, temperature=0, max_tokens=5)
    assert answer.choices[0].finish_reason == "length"  # and the model serves on


def test_unload_while_several_slots_generate_ends_them_cleanly(engine_server: RunningServer) -> None:
    client = sdk(engine_server)
    client.chat.completions.create(model=SMOL, messages=COUNTING, max_tokens=1)
    streams = [StreamInThread(engine_server.base_url, f"u{i}", model=SMOL, max_tokens=400) for i in range(3)]
    wait_until(lambda: info(engine_server, SMOL)["slots_in_use"] == 3, "three slots generate")
    unloaded = httpx.post(f"{engine_server.base_url}/admin/api/models/{SMOL}/unload", timeout=60).json()
    assert unloaded["state"] == "unloaded"
    for stream in streams:
        stream.join()
        assert stream.lines[-1] == "data: [DONE]"
        assert json.loads(stream.lines[-2][6:])["error"]["code"] == "model_unloaded"
    answer = client.chat.completions.create(model=SMOL, messages=COUNTING, temperature=0, max_tokens=5)
    assert answer.choices[0].message.content  # loaded again, and answering


def test_slots_and_cache_show_in_the_admin_api(engine_server: RunningServer, tmp_path: Path) -> None:
    sdk(engine_server).chat.completions.create(model=SMOL, messages=COUNTING, max_tokens=2)
    view = httpx.get(f"{engine_server.base_url}/admin/api/models/{SMOL}", timeout=30).json()
    loaded = view["loaded"]
    assert loaded["slots"] == 4 and loaded["slots_in_use"] == 0 and len(loaded["slot_cached_tokens"]) == 4
    assert loaded["kv_cache_tokens"] >= 4 * loaded["context_size"] and view["concurrency"] == 4


def test_common_prefix() -> None:
    from backends.engine.slots import common_prefix

    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3 and common_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert common_prefix([], [1]) == 0 and common_prefix([7] * 1000 + [1], [7] * 1000 + [2]) == 1000


def test_a_slot_is_chosen_to_keep_the_most_of_the_cache() -> None:
    """The dialogue a prompt continues keeps its slot; an unrelated prompt takes an empty slot before it takes
    one that holds another dialogue; the longest prefix any slot holds is the one to copy."""
    from backends.engine.slots import Slot, choose_slot

    rules, a, b = list(range(100)), [1000, 1001], [2000, 2001]
    dialogue_a = Slot(0, cached=rules + a + [7, 8], prompt_length=len(rules + a), last_used=2.0)
    dialogue_b = Slot(1, cached=rules + b, prompt_length=len(rules + b), last_used=1.0)
    empty = Slot(2)
    slots = [dialogue_a, dialogue_b, empty]
    slot, own, _, _ = choose_slot(slots, slots, rules + a + [7, 9, 3])  # A's next turn
    assert slot is dialogue_a and own == len(rules + a) + 1
    slot, own, donor, shared = choose_slot(slots, slots, [*rules, 3000])  # a third dialogue of the same game
    assert slot is empty and own == 0 and donor is dialogue_a and shared == len(rules)
    slot, _, _, _ = choose_slot([dialogue_a, dialogue_b], slots, [5, 6])  # no empty slot: the least recently used
    assert slot is dialogue_b
