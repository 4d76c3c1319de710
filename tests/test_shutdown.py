"""Graceful shutdown of a real ``clemproxy serve`` process: on SIGTERM new requests get 503, a running stream
finishes (or, past --shutdown-timeout, ends with a clear error event), and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import SMOL, ServerProcess, smol_entry, smol_hf_entry, write_registry

COUNTING = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]


def stream_in_thread(base_url: str, model: str, max_tokens: int) -> tuple[threading.Thread, list[str]]:
    lines: list[str] = []
    body = {"model": model, "messages": COUNTING, "temperature": 0, "max_tokens": max_tokens, "stream": True}

    def run() -> None:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as response:
            lines.extend(line for line in response.iter_lines() if line)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, lines


def wait_running(base_url: str, model: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        models = httpx.get(f"{base_url}/admin/api/models", timeout=10).json()["models"]
        if next(m for m in models if m["name"] == model)["in_flight"] == 1:
            return
        assert time.monotonic() < deadline, "the stream never started"
        time.sleep(0.01)


def events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_sigterm_lets_a_running_stream_finish_and_refuses_new_requests(tmp_path: Path) -> None:
    registry = write_registry(tmp_path / "model_registry.json", [smol_entry()])
    with ServerProcess(registry, "--shutdown-timeout", "60") as server:
        base_url = server.base_url
        thread, lines = stream_in_thread(base_url, SMOL, max_tokens=300)
        wait_running(base_url, SMOL)
        server.process.send_signal(signal.SIGTERM)
        refused = httpx.post(
            f"{base_url}/v1/chat/completions", json={"model": SMOL, "messages": COUNTING, "max_tokens": 2}, timeout=30
        )
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert "shutting down" in refused.json()["error"]["message"]
        thread.join(timeout=120)
        finishing = [e for e in events(lines) if e.get("choices") and e["choices"][0]["finish_reason"]]
        assert [e["choices"][0]["finish_reason"] for e in finishing] == ["length"] and lines[-1] == "data: [DONE]"
        assert server.process.wait(timeout=60) == 0


def test_sigterm_past_the_timeout_ends_streams_with_an_error(tmp_path: Path, smol_checkpoint: Path) -> None:
    # transformers on two cores is slow enough that 300 tokens outlast a 0.5 s shutdown timeout.
    registry = write_registry(tmp_path / "model_registry.json", [smol_hf_entry("smol-hf", smol_checkpoint)])
    with ServerProcess(registry, "--shutdown-timeout", "0.5") as server:
        base_url = server.base_url
        thread, lines = stream_in_thread(base_url, "smol-hf", max_tokens=300)
        wait_running(base_url, "smol-hf")
        server.process.send_signal(signal.SIGTERM)
        thread.join(timeout=120)
        assert lines[-1] == "data: [DONE]"
        error = events(lines)[-1]["error"]
        assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]
        assert server.process.wait(timeout=60) == 0
