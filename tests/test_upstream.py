"""``openai_compatible`` entries: a clemproxy that forwards to a second, real clemproxy on loopback serving the real
model, as it would forward to vLLM or llama-server. The openai SDK is the client; every body and event is
schema-checked. Two deliberately broken servers stand in for upstreams that hang or break a stream."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends import ModelRegistry
from proxy.settings import Settings
from tests.support import (
    COUNTING,
    SMOL,
    RunningServer,
    SchemaCheckingTransport,
    free_port,
    smol_entry,
    wait_until,
)

UPSTREAM_KEY = "upstream-secret-key"
REMOTE = "remote-smol"


class SilentServer:
    """Accepts connections and reads requests, then answers nothing (``answer`` None) or a fixed reply and hangs
    up: an upstream that hangs, or one that breaks its stream."""

    def __init__(self, answer: bytes | None = None) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            conn.recv(65536)
            if self.answer is not None:
                conn.sendall(self.answer)
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


BROKEN_STREAM = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"x","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}\n\n'
)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The real upstream: clemproxy serving the real model on llama.cpp, behind an API key."""
    root = tmp_path_factory.mktemp("upstream")
    registry = ModelRegistry.from_list([smol_entry()], str(root / "model_registry.json"))
    with RunningServer(registry, Settings.of(api_key=(UPSTREAM_KEY,), preload=(SMOL,))) as server:
        yield server


@pytest.fixture(scope="module")
def broken() -> Iterator[tuple[SilentServer, SilentServer]]:
    hanging, breaking = SilentServer(), SilentServer(BROKEN_STREAM)
    yield hanging, breaking
    hanging.close()
    breaking.close()


@pytest.fixture(scope="module")
def front(
    upstream: RunningServer, broken: tuple[SilentServer, SilentServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """The forwarding clemproxy, its upstream's key in key.json (its working directory), as clembench keeps it."""
    hanging, breaking = broken
    root = tmp_path_factory.mktemp("front")
    (root / "key.json").write_text(json.dumps({"openai_compatible": {"api_key": UPSTREAM_KEY}}))
    up = f"{upstream.base_url}/v1"
    entries = [
        {"model_name": REMOTE, "backend": "openai_compatible", "model_id": SMOL, "base_url": up},
        {"model_name": "remote-unknown", "backend": "openai_compatible", "model_id": "no-such-model", "base_url": up},
        {"model_name": "remote-dead", "backend": "openai_compatible", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
        {"model_name": "remote-hanging", "backend": "openai_compatible", "base_url": hanging.base_url},
        {"model_name": "remote-breaking", "backend": "openai_compatible", "base_url": breaking.base_url},
        {  # clemcore's extra_body: merged into every forwarded body
            "model_name": "remote-extra",
            "backend": "openai_compatible",
            "model_id": SMOL,
            "base_url": up,
            "extra_body": {"stop": [","], "max_tokens": 6},
        },
        {
            "model_name": "remote-one",
            "backend": "openai_compatible",
            "model_id": SMOL,
            "base_url": up,
            "concurrency": 1,
        },
    ]
    registry = ModelRegistry.from_list(entries, str(root / "model_registry.json"))
    settings = Settings.of(upstream_read_timeout=10.0, max_queue=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        with RunningServer(registry, settings) as server:
            yield server


@pytest.fixture(scope="module")
def clients(upstream: RunningServer, front: RunningServer, openai_schemas: dict[str, Any]) -> tuple[Any, Any]:
    from openai import OpenAI

    def client(base_url: str, key: str) -> OpenAI:
        http_client = httpx.Client(transport=SchemaCheckingTransport(openai_schemas), timeout=60)
        return OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, http_client=http_client)

    return client(front.base_url, "unused"), client(upstream.base_url, UPSTREAM_KEY)


def running_upstream(upstream: RunningServer) -> int:
    slot = upstream.services.manager.existing_slot(SMOL)
    return len(slot.queue.running) if slot is not None else 0


def test_forwarded_greedy_text_equals_the_upstreams(clients: tuple[Any, Any]) -> None:
    front, direct = clients
    ask = {"messages": COUNTING, "max_tokens": 24, "temperature": 0}
    forwarded = front.chat.completions.create(model=REMOTE, **ask)
    itself = direct.chat.completions.create(model=SMOL, **ask)
    assert forwarded.model == REMOTE and itself.model == SMOL
    assert forwarded.choices[0].message.content == itself.choices[0].message.content
    assert forwarded.usage.completion_tokens == itself.usage.completion_tokens == 24

    legacy = {"prompt": "1, 2, 3,", "max_tokens": 8, "temperature": 0}
    forwarded_text = front.completions.create(model=REMOTE, **legacy)
    assert forwarded_text.model == REMOTE
    assert forwarded_text.choices[0].text == direct.completions.create(model=SMOL, **legacy).choices[0].text


def test_an_entrys_extra_body_is_merged_into_the_forwarded_body(clients: tuple[Any, Any]) -> None:
    front, direct = clients
    ask = {"messages": COUNTING, "temperature": 0}
    forwarded = front.chat.completions.create(model="remote-extra", max_tokens=24, **ask)  # the request's wins
    itself = direct.chat.completions.create(model=SMOL, max_tokens=24, stop=[","], **ask)
    assert forwarded.choices[0].message.content == itself.choices[0].message.content
    assert forwarded.choices[0].finish_reason == itself.choices[0].finish_reason == "stop"
    defaults = front.chat.completions.create(model="remote-extra", messages=[{"role": "user", "content": "Hi"}])
    assert defaults.usage.completion_tokens <= 6  # the entry's max_tokens, where the request has none


def test_forwarded_stream_passes_the_schema_checks(clients: tuple[Any, Any]) -> None:
    front, direct = clients
    ask = {"messages": COUNTING, "max_tokens": 16, "temperature": 0}
    chunks = list(
        front.chat.completions.create(model=REMOTE, stream=True, stream_options={"include_usage": True}, **ask)
    )
    assert {chunk.model for chunk in chunks} == {REMOTE}
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == direct.chat.completions.create(model=SMOL, **ask).choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 16

    texts = list(front.completions.create(model=REMOTE, prompt="1, 2, 3,", max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in texts if c.choices)


def test_a_dead_upstream_is_a_502_naming_it(clients: tuple[Any, Any], front: RunningServer) -> None:
    from openai import APIStatusError

    with pytest.raises(APIStatusError) as raised:
        clients[0].chat.completions.create(model="remote-dead", messages=COUNTING, max_tokens=4)
    assert raised.value.status_code == 502
    error = raised.value.body
    assert error["code"] == "upstream_unreachable" and "http://127.0.0.1:" in error["message"]
    with pytest.raises(APIStatusError) as streamed:
        clients[0].chat.completions.create(model="remote-dead", messages=COUNTING, max_tokens=4, stream=True)
    assert streamed.value.status_code == 502
    assert httpx.get(f"{front.base_url}/health").status_code == 200  # still up


def test_an_upstream_that_stays_silent_is_a_504(clients: tuple[Any, Any]) -> None:
    from openai import APIStatusError

    started = time.monotonic()
    with pytest.raises(APIStatusError) as raised:
        clients[0].chat.completions.create(model="remote-hanging", messages=COUNTING, max_tokens=4)
    assert raised.value.status_code == 504 and raised.value.body["code"] == "upstream_timeout"
    assert time.monotonic() - started < 20  # the front's read timeout is 10 s


def test_an_upstream_error_is_passed_on_with_its_status(clients: tuple[Any, Any], front: RunningServer) -> None:
    body = {"messages": COUNTING, "max_tokens": 100_000}  # more than the upstream's context: its 400
    forwarded = httpx.post(f"{front.base_url}/v1/chat/completions", json={"model": REMOTE, **body})
    direct = httpx.post(
        f"{clients[1].base_url}chat/completions",
        json={"model": SMOL, **body},
        headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
    )
    assert forwarded.status_code == direct.status_code == 400
    assert forwarded.json() == direct.json()
    assert forwarded.json()["error"]["code"] == "context_length_exceeded"

    from openai import APIStatusError, NotFoundError

    with pytest.raises(NotFoundError) as missing:  # the upstream does not know the entry's model_id
        clients[0].chat.completions.create(model="remote-unknown", messages=COUNTING, max_tokens=4, stream=True)
    assert missing.value.body["code"] == "model_not_found" and "no-such-model" in missing.value.body["message"]
    with pytest.raises(APIStatusError):
        clients[0].chat.completions.create(model="remote-unknown", messages=COUNTING, max_tokens=4)


def test_a_stream_the_upstream_breaks_ends_with_an_error_event(front: RunningServer) -> None:
    body = {"model": "remote-breaking", "messages": COUNTING, "stream": True}
    with httpx.stream("POST", f"{front.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "Hel"
    assert json.loads(events[0])["model"] == "remote-breaking"
    assert json.loads(events[-2])["error"]["code"] == "upstream_stream_broken"
    assert events[-1] == "[DONE]"


def test_a_client_that_leaves_cancels_the_upstream_request(front: RunningServer, upstream: RunningServer) -> None:
    body = {"model": REMOTE, "messages": COUNTING, "max_tokens": 2000, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{front.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        assert running_upstream(upstream) == 1
    left = time.monotonic()
    wait_until(lambda: running_upstream(upstream) == 0, "the upstream ended the generation", 10)
    assert time.monotonic() - left < 5  # 2000 tokens would take far longer

    with pytest.raises(httpx.ReadTimeout):  # a whole answer the client stops waiting for, before the front would
        httpx.post(f"{front.base_url}/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
    left = time.monotonic()
    wait_until(lambda: running_upstream(upstream) == 0, "the upstream ended the whole answer", 10)
    assert time.monotonic() - left < 3  # far sooner than the front's own 10 s read timeout


def test_forwarded_requests_have_the_queue_bound_of_local_ones(front: RunningServer) -> None:
    body = {"model": "remote-one", "messages": COUNTING, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{front.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        refused = httpx.post(f"{front.base_url}/v1/chat/completions", json={**body, "stream": False})
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "model_overloaded"


def test_remote_entries_on_the_admin_api(front: RunningServer, clients: tuple[Any, Any]) -> None:
    clients[0].chat.completions.create(model=REMOTE, messages=COUNTING, max_tokens=2)
    answer = httpx.get(f"{front.base_url}/admin/api/models")
    assert UPSTREAM_KEY not in answer.text
    rows = {row["name"]: row for row in answer.json()["models"]}
    live, dead = rows[REMOTE], rows["remote-dead"]
    assert live["state"] == dead["state"] == "remote"
    assert live["remote"]["reachable"] is True and live["remote"]["model_id"] == SMOL
    assert live["requests_served"] >= 1
    assert dead["remote"]["reachable"] is False and "could not be reached" in dead["remote"]["error"]
    loaded = httpx.post(f"{front.base_url}/admin/api/models/{REMOTE}/load").json()
    assert loaded["state"] == "remote" and "nothing to load" in loaded["note"]
    assert httpx.post(f"{front.base_url}/admin/api/models/{REMOTE}/unload").json()["state"] == "remote"
    assert REMOTE not in answer.json()["loaded"]  # remote entries hold no memory here

    page = httpx.get(f"{front.base_url}/admin/")
    assert "nothing to load or unload" in page.text and "unreachable" in page.text
    assert UPSTREAM_KEY not in page.text


def test_an_entry_without_a_base_url_says_where_to_put_one(tmp_path: Path) -> None:
    registry = ModelRegistry.from_list([{"model_name": "nowhere", "backend": "openai_compatible"}])
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        patch.setenv("HOME", str(tmp_path))
        with RunningServer(registry) as server:
            answer = httpx.post(
                f"{server.base_url}/v1/chat/completions", json={"model": "nowhere", "messages": COUNTING}
            )
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "upstream_not_configured"
    assert "base_url" in answer.json()["error"]["message"]


def test_registry_checks_upstream_keys() -> None:
    registry = ModelRegistry.from_list(
        [
            {"model_name": "a", "backend": "openai_compatible", "base_url": "ftp://host/v1"},
            {"model_name": "b", "backend": "openai_compatible", "model_id": ""},
            {"model_name": "c", "backend": "openai_compatible", "base_url": "http://gpu-node:8000/v1"},
        ]
    )
    a, b, c = registry.entries
    assert [p.key for p in a.errors] == ["base_url"] and [p.key for p in b.errors] == ["model_id"]
    assert c.is_served and not c.problems
