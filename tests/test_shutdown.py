"""Graceful shutdown of a real ``clemproxy serve`` process: on SIGTERM new requests get 503, a running stream
finishes (or, past --shutdown-timeout, ends with a clear error event), and the process exits 0."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx

from tests.support import (
    COUNTING,
    SMOL,
    ServerProcess,
    StreamInThread,
    smol_entry,
    smol_hf_entry,
    wait_until,
    write_registry,
)


def in_flight(base_url: str, model: str) -> int:
    models = httpx.get(f"{base_url}/admin/api/models", timeout=10).json()["models"]
    return int(next(m for m in models if m["name"] == model)["in_flight"])


def test_sigterm_lets_a_running_stream_finish_and_refuses_new_requests(tmp_path: Path) -> None:
    registry = write_registry(tmp_path / "model_registry.json", [smol_entry()])
    with ServerProcess(registry, "--shutdown-timeout", "60") as server:
        base_url = server.base_url
        stream = StreamInThread(base_url, model=SMOL, max_tokens=300)
        wait_until(lambda: in_flight(base_url, SMOL) == 1, "the stream runs")
        server.process.send_signal(signal.SIGTERM)
        refused = httpx.post(
            f"{base_url}/v1/chat/completions", json={"model": SMOL, "messages": COUNTING, "max_tokens": 2}, timeout=30
        )
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert "shutting down" in refused.json()["error"]["message"]
        stream.join()
        assert stream.finish_reasons == ["length"] and stream.lines[-1] == "data: [DONE]"
        assert server.process.wait(timeout=60) == 0


def test_sigterm_past_the_timeout_ends_streams_with_an_error(tmp_path: Path, smol_checkpoint: Path) -> None:
    # transformers on two cores is slow enough that 300 tokens outlast a 0.5 s shutdown timeout.
    registry = write_registry(tmp_path / "model_registry.json", [smol_hf_entry("smol-hf", smol_checkpoint)])
    with ServerProcess(registry, "--shutdown-timeout", "0.5") as server:
        base_url = server.base_url
        stream = StreamInThread(base_url, model="smol-hf", max_tokens=300)
        wait_until(lambda: in_flight(base_url, "smol-hf") == 1, "the stream runs")
        server.process.send_signal(signal.SIGTERM)
        stream.join()
        assert stream.lines[-1] == "data: [DONE]"
        error = stream.events[-1]["error"]
        assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]
        assert server.process.wait(timeout=60) == 0
