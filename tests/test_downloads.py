"""A load that downloads its weights: the real ``huggingface_hub`` client in a real server, fetching the real demo
GGUF from a stand-in hub on loopback (``HF_ENDPOINT``) that serves it slowly enough to watch."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support import COUNTING, ServerProcess, smollm2_gguf, wait_until, write_registry
from tests.support.hub import StandInHub

REPO = "stand-in/smollm2"
NAME = "downloaded-smol"


def entry() -> dict[str, Any]:
    return {
        "model_name": NAME,
        "backend": "llamacpp",
        "huggingface_id": REPO,
        "filename": "*Q4_1.gguf",
        "premade_chat_template": True,
        "eos_to_cull": "<\\|im_end\\|>",
    }


def row(server: ServerProcess) -> dict[str, Any]:
    return dict(httpx.get(f"{server.base_url}/admin/api/models/{NAME}", timeout=30).json())


def settled_count(hub: StandInHub, quiet_s: float = 0.3, deadline_s: float = 10) -> int:
    """The hub's bytes sent, once no write has come for ``quiet_s``."""
    deadline = time.monotonic() + deadline_s
    while True:
        before = hub.bytes_sent
        time.sleep(quiet_s)
        if hub.bytes_sent == before or time.monotonic() > deadline:
            return hub.bytes_sent


def test_a_download_reports_progress_stops_when_unloaded_and_resumes(tmp_path: Path) -> None:
    gguf = smollm2_gguf()
    size = gguf.stat().st_size
    with StandInHub({REPO: {gguf.name: gguf}}, bytes_per_second=size // 6) as hub:  # six seconds for the file
        registry = write_registry(tmp_path / "model_registry.json", [entry()])
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        with ServerProcess(registry, env=env) as server:
            answers: list[httpx.Response] = []

            def load() -> None:
                answers.append(httpx.post(f"{server.base_url}/admin/api/models/{NAME}/load", timeout=120))

            first = threading.Thread(target=load)
            first.start()
            wait_until(lambda: (row(server).get("download") or {}).get("bytes_done", 0) > size // 5, "downloading", 60)
            seen = row(server)
            assert seen["state"] == "loading" and seen["stage"] == "downloading"
            download = seen["download"]
            assert download["bytes_total"] == size and 0 < download["fraction"] < 1
            assert download["bytes_per_second"] > 0 and download["seconds_left"] > 0

            unloaded = httpx.post(f"{server.base_url}/admin/api/models/{NAME}/unload", timeout=60)
            assert unloaded.status_code == 200 and unloaded.json()["state"] == "unloaded"
            first.join(timeout=60)
            assert answers[0].status_code == 503 and answers[0].json()["error"]["code"] == "load_cancelled"
            # Stopped: no block for 0.3 s (the hub writes one every 50 ms). One block may still follow the worker's
            # exit: the first write to a socket its peer has closed succeeds, only the next one fails.
            stopped_at = settled_count(hub)
            assert stopped_at < size

            loaded = httpx.post(f"{server.base_url}/admin/api/models/{NAME}/load", timeout=120)
            assert loaded.status_code == 200 and loaded.json()["state"] == "loaded", loaded.text
            resumed = [r for method, path, r in hub.requests if method == "GET" and "/resolve/" in path]
            assert len(resumed) == 2 and resumed[0] is None  # the second GET continues the first
            start = int(str(resumed[1]).removeprefix("bytes=").rstrip("-"))
            assert 0 < start <= stopped_at and hub.bytes_sent == stopped_at + size - start
            assert row(server).get("download") is None and row(server)["stage"] is None
            reply = httpx.post(
                f"{server.base_url}/v1/chat/completions",
                json={"model": NAME, "messages": COUNTING, "max_tokens": 4},
                timeout=60,
            )
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
