"""Each loaded model in its own worker process: real models, a real server, real signals to the workers.

A worker that dies ends its requests with an error (an error event and ``[DONE]`` on a stream), the model's
row says failed with the signal, other models go on serving, and the next request loads a fresh worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from backends import ModelRegistry
from proxy.settings import Settings
from tests.support import COUNTING, SMOL, SMOL_HF, RunningServer, smol_entry, smol_hf_entry, write_registry
from tests.support.models import ENDLESS, WORDS
from tests.support.servers import StreamInThread, wait_until

LONG = 3000  # tokens a stream asks for: it is still generating when its worker is killed


def row(server: RunningServer, name: str) -> dict[str, Any]:
    body = httpx.get(f"{server.base_url}/admin/api/models", timeout=30).json()
    models = body["models"] if isinstance(body, dict) else body
    return next(m for m in models if m["name"] == name)


def worker_of(server: RunningServer, name: str) -> dict[str, Any]:
    loaded = row(server, name)["loaded"]
    assert loaded is not None, f"{name} is not loaded"
    return dict(loaded["worker"])


def load(server: RunningServer, name: str) -> None:
    response = httpx.post(f"{server.base_url}/admin/api/models/{name}/load", timeout=300)
    assert response.status_code == 200, response.text


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def two_model_server(tmp_path_factory: pytest.TempPathFactory, smol_checkpoint: Path) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("workers")
    path = write_registry(root / "model_registry.json", [smol_entry(), smol_hf_entry(SMOL_HF, smol_checkpoint)])
    # The thread budget's shares are checked exactly: it does not follow what other programs on this machine use.
    settings = Settings.of(threads=2, unload_timeout=5, threads_follow_load=False)
    with RunningServer(ModelRegistry.from_files([path]), settings) as server:
        load(server, SMOL)
        load(server, SMOL_HF)
        yield server


def ended_with_error_then_done(stream: StreamInThread) -> str:
    """The stream's error message; it must be the last event, followed by [DONE]."""
    assert stream.status == 200
    assert stream.lines[-1] == "data: [DONE]", stream.lines[-3:]
    last = stream.events[-1]
    assert "error" in last, last
    return str(last["error"]["message"])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_a_worker_killed_mid_stream_ends_its_streams_and_spares_the_other_model(
    two_model_server: RunningServer, sig: signal.Signals
) -> None:
    server = two_model_server
    if row(server, SMOL)["state"] != "loaded":
        load(server, SMOL)
    pid = worker_of(server, SMOL)["pid"]
    other = StreamInThread(
        server.base_url, "other", model=SMOL_HF, max_tokens=300, messages=WORDS, response_format=ENDLESS
    )
    wait_until(lambda: len(other.lines) > 2, "the other model streams")
    victims = [
        StreamInThread(server.base_url, f"victim{i}", max_tokens=LONG, messages=WORDS, response_format=ENDLESS)
        for i in range(3)
    ]
    wait_until(lambda: all(len(v.lines) > 3 for v in victims), "every stream has begun")
    assert other.thread.is_alive()  # mid-stream when the worker next to it dies
    os.kill(pid, sig)
    killed = time.monotonic()
    for victim in victims:
        victim.join()
    ended = time.monotonic() - killed
    for victim in victims:
        message = ended_with_error_then_done(victim)
        assert sig.name in message and SMOL in message, message
        assert victim.finish_reasons == []  # cut short, not finished
    # Event-driven: the streams end as soon as the worker's socket closes (a second, here; loose for busy CI).
    assert ended < 10, ended
    other.join()
    assert other.status == 200 and other.finish_reasons == ["length"] and other.text  # unharmed
    failed = row(server, SMOL)
    assert failed["state"] == "failed" and sig.name in failed["error"]
    assert process_gone(pid)
    # The next request loads a fresh worker.
    answer = client(server).chat.completions.create(model=SMOL, messages=COUNTING, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content
    assert worker_of(server, SMOL)["pid"] != pid
    assert row(server, SMOL)["state"] == "loaded"
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200


def test_a_whole_answer_cut_by_a_crash_is_a_502_naming_the_model_and_the_signal(
    two_model_server: RunningServer,
) -> None:
    server = two_model_server
    if row(server, SMOL)["state"] != "loaded":
        load(server, SMOL)
    pid = worker_of(server, SMOL)["pid"]
    failure: list[BaseException] = []

    def ask() -> None:
        try:
            client(server).chat.completions.create(
                model=SMOL, messages=WORDS, max_tokens=LONG, temperature=0, response_format=ENDLESS
            )
        except BaseException as exc:
            failure.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    wait_until(lambda: row(server, SMOL)["in_flight"] == 1, "the request generates")
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    asking.join(timeout=60)
    assert len(failure) == 1 and isinstance(failure[0], openai.APIStatusError), failure
    error = failure[0]
    assert error.status_code == 502
    assert "SIGKILL" in error.message and SMOL in error.message
    assert error.body["code"] == "model_crashed"  # type: ignore[index]


def test_the_thread_budget_is_shared_by_the_models_generating(two_model_server: RunningServer) -> None:
    server = two_model_server
    for name in (SMOL, SMOL_HF):
        if row(server, name)["state"] != "loaded":
            load(server, name)
    # Both generating: one thread each of the server's two, in each engine.
    streams = [
        StreamInThread(server.base_url, name, model=name, max_tokens=300, messages=WORDS, response_format=ENDLESS)
        for name in (SMOL, SMOL_HF)
    ]
    wait_until(
        lambda: all(row(server, n)["loaded"]["threads"] == 1 for n in (SMOL, SMOL_HF)), "each engine uses one thread"
    )
    assert worker_of(server, SMOL)["threads"] == worker_of(server, SMOL_HF)["threads"] == 1
    for stream in streams:
        stream.join()
    # One generating alone gets both.
    alone = StreamInThread(
        server.base_url, "alone", model=SMOL, max_tokens=600, messages=WORDS, response_format=ENDLESS
    )
    wait_until(lambda: row(server, SMOL)["loaded"]["threads"] == 2, "the engine generating alone uses two")
    alone.join()


def test_unloading_ends_the_worker_and_gives_its_memory_back(two_model_server: RunningServer) -> None:
    server = two_model_server
    if row(server, SMOL_HF)["state"] != "loaded":
        load(server, SMOL_HF)
    worker = worker_of(server, SMOL_HF)
    assert worker["resident_bytes"] > 100 * 1024**2  # the weights are in that process, not in the server
    response = httpx.post(f"{server.base_url}/admin/api/models/{SMOL_HF}/unload", timeout=60)
    assert response.status_code == 200, response.text
    assert process_gone(worker["pid"])
    assert row(server, SMOL_HF)["state"] == "unloaded"


def test_a_worker_killed_while_it_loads_fails_the_waiting_requests(two_model_server: RunningServer) -> None:
    server = two_model_server
    if row(server, SMOL_HF)["state"] == "loaded":
        httpx.post(f"{server.base_url}/admin/api/models/{SMOL_HF}/unload", timeout=60)
    failure: list[BaseException] = []

    def ask() -> None:
        try:
            client(server).chat.completions.create(model=SMOL_HF, messages=COUNTING, max_tokens=8)
        except BaseException as exc:
            failure.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    wait_until(lambda: row(server, SMOL_HF).get("loading_pid") is not None, "a worker loads the model")
    os.kill(row(server, SMOL_HF)["loading_pid"], signal.SIGKILL)
    asking.join(timeout=120)
    assert len(failure) == 1 and isinstance(failure[0], openai.APIStatusError), failure
    assert failure[0].status_code >= 500 and "SIGKILL" in failure[0].message
    failed = row(server, SMOL_HF)
    assert failed["state"] == "failed" and "SIGKILL" in failed["error"]
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    load(server, SMOL_HF)  # and it loads again


def test_a_model_that_keeps_crashing_stays_failed_until_it_is_loaded_on_purpose(
    two_model_server: RunningServer,
) -> None:
    server = two_model_server
    load(server, SMOL)  # on purpose: whatever crashed before in this server is forgiven
    ask = client(server).chat.completions.create
    for _ in range(3):
        ask(model=SMOL, messages=COUNTING, max_tokens=2)  # loads a fresh worker if need be
        pid = worker_of(server, SMOL)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: row(server, SMOL)["state"] == "failed", "the model is failed")
    assert row(server, SMOL)["crash_looping"]
    with pytest.raises(openai.APIStatusError) as refused:
        ask(model=SMOL, messages=COUNTING, max_tokens=2)
    assert refused.value.status_code >= 500 and "3 times" in refused.value.message
    assert row(server, SMOL)["state"] == "failed"  # no fresh worker was started for it
    load(server, SMOL)  # on purpose: it may try again
    assert ask(model=SMOL, messages=COUNTING, max_tokens=2).choices[0].message.content is not None
    assert not row(server, SMOL)["crash_looping"]


def test_the_admin_page_shows_each_worker_and_where_the_weights_are(two_model_server: RunningServer) -> None:
    server = two_model_server
    for name in (SMOL, SMOL_HF):
        if row(server, name)["state"] != "loaded":
            load(server, name)
    page = httpx.get(f"{server.base_url}/admin", timeout=120).text
    for name in (SMOL, SMOL_HF):
        worker = worker_of(server, name)
        assert f"worker pid {worker['pid']}" in page and "resident" in page
    buffers = row(server, SMOL)["loaded"]["weight_buffers"]
    assert f"weights: {', '.join(f'{k} {v}' for k, v in buffers.items())}" in page


def test_the_thread_budget_leaves_out_a_core_another_program_keeps_busy(tmp_path: Path) -> None:
    """A plain busy loop pinned to one core: the GGUF model generating alone drops to the cores left free
    (every core but that one), instead of stalling its thread pool on the busy core. On a one-core machine the
    budget keeps its floor of one thread."""
    path = write_registry(tmp_path / "model_registry.json", [smol_entry()])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, {0})
        with RunningServer(ModelRegistry.from_files([path]), Settings.of(unload_timeout=5)) as server:
            load(server, SMOL)
            stream = StreamInThread(server.base_url, "alone", max_tokens=LONG, messages=WORDS, response_format=ENDLESS)
            free = max((os.cpu_count() or 1) - 1, 1)
            wait_until(lambda: worker_of(server, SMOL)["threads"] == free, f"the model decodes with {free} threads")
            wait_until(lambda: row(server, SMOL)["loaded"]["threads"] == free, "its engine took them")
            httpx.post(f"{server.base_url}/admin/api/models/{SMOL}/unload", timeout=60)
            stream.join()
    finally:
        busy.kill()
        busy.wait()
