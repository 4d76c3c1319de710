"""``clemproxy serve --ray local``: the real model deployed as a Ray Serve deployment with two replicas, on a real
private Ray instance that the server starts (one for the whole module) and shuts down when it stops. Every
process the server started is ended by PID at the end, should any outlive it; no other Ray process is touched."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from backends import ModelRegistry
from tests.support import (
    COUNTING,
    SMOL,
    RunningServer,
    SchemaCheckingTransport,
    ServerProcess,
    smol_entry,
    wait_until,
    write_registry,
)

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc: the Ray instance a server started, with its workers."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("ray")
    registry = write_registry(root / "model_registry.json", [smol_entry(replicas=2, parallel=2)])
    server = ServerProcess(
        registry, "--ray", "local", "--preload", SMOL, "--data-dir", ":memory:", env={"RAY_USAGE_STATS_ENABLED": "0"}
    )
    started: set[int] = set()
    try:
        server.wait_serving(timeout=180)  # Ray starts, then both replicas load the model
        started = descendants(server.process.pid)
        yield server
    finally:
        started |= descendants(server.process.pid)
        server.stop(signal.SIGTERM, timeout=90)  # the server shuts its own Ray instance down
        for pid in started:  # and anything of it that outlived it, by PID
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def client(ray_server: ServerProcess, openai_schemas: dict[str, Any]) -> Any:
    from openai import OpenAI

    http_client = httpx.Client(transport=SchemaCheckingTransport(openai_schemas), timeout=120)
    return OpenAI(base_url=f"{ray_server.base_url}/v1", api_key="unused", max_retries=0, http_client=http_client)


def row(server: ServerProcess) -> dict[str, Any]:
    answer = httpx.get(f"{server.base_url}/admin/api/models/{SMOL}", timeout=30)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def running_replicas(server: ServerProcess) -> list[dict[str, Any]]:
    return [r for r in row(server).get("replicas", []) if r["state"] == "RUNNING"]


def test_concurrent_streams_complete_on_both_replicas(client: Any, ray_server: ServerProcess) -> None:
    texts: dict[int, str] = {}

    def stream(index: int) -> None:
        chunks = client.chat.completions.create(
            model=SMOL, messages=COUNTING, max_tokens=24, temperature=0, stream=True
        )
        texts[index] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(texts) == [0, 1, 2, 3] and len(set(texts.values())) == 1  # greedy: four times the same text

    replicas = running_replicas(ray_server)
    assert len(replicas) == 2
    assert all(r["requests_served"] >= 1 for r in replicas), replicas  # two slots each: four streams need both
    assert all(r["node_id"] and r["pid"] for r in replicas)
    page = httpx.get(f"{ray_server.base_url}/admin/", timeout=30).text
    assert all(r["replica"] in page for r in replicas)


def test_greedy_text_equals_the_single_process_servers(client: Any) -> None:
    ask = {"messages": COUNTING, "max_tokens": 24, "temperature": 0}
    deployed = client.chat.completions.create(model=SMOL, **ask)
    with RunningServer(ModelRegistry.from_list([smol_entry(parallel=2)])) as single:
        answer = httpx.post(f"{single.base_url}/v1/chat/completions", json={"model": SMOL, **ask}, timeout=120)
    assert deployed.choices[0].message.content == answer.json()["choices"][0]["message"]["content"]
    assert (
        deployed.usage.completion_tokens == 24
        and deployed.usage.prompt_tokens == answer.json()["usage"]["prompt_tokens"]
    )
    logprobs = client.chat.completions.create(model=SMOL, logprobs=True, top_logprobs=2, **ask)
    assert "".join(t.token for t in logprobs.choices[0].logprobs.content) == deployed.choices[0].message.content
    too_long = httpx.post(
        f"{client.base_url}chat/completions", json={"model": SMOL, **ask, "max_tokens": 100_000}, timeout=60
    )
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


def test_the_responses_api_runs_on_the_replicas(client: Any) -> None:
    """The Responses API is the same path: the same greedy text as chat completions, streamed or whole, and a
    continued conversation."""
    ask = {"model": SMOL, "input": COUNTING[0]["content"], "temperature": 0, "max_output_tokens": 24}
    whole = client.responses.create(**ask)
    chat = client.chat.completions.create(model=SMOL, messages=COUNTING, max_tokens=24, temperature=0)
    assert whole.output_text == chat.choices[0].message.content and whole.status == "incomplete"
    events = list(client.responses.create(stream=True, **ask))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].type == "response.incomplete"
    later = client.responses.create(
        model=SMOL, previous_response_id=whole.id, input="Go on.", temperature=0, max_output_tokens=8
    )
    assert later.usage.input_tokens > whole.usage.input_tokens + whole.usage.output_tokens


def test_a_client_that_leaves_ends_its_generation(ray_server: ServerProcess) -> None:
    body = {"model": SMOL, "messages": STORY, "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{ray_server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        while '"content":"' not in next(lines):
            pass
        assert sum(r["in_flight"] for r in running_replicas(ray_server)) == 1
    wait_until(lambda: sum(r["in_flight"] for r in running_replicas(ray_server)) == 0, "the generation ended", 10)


def test_a_killed_replica_gives_a_clean_error_then_recovers(client: Any, ray_server: ServerProcess) -> None:
    body = {"model": SMOL, "messages": STORY, "max_tokens": 1500, "temperature": 0, "stream": True}
    events: list[str] = []

    def read() -> None:
        with httpx.stream("POST", f"{ray_server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
            events.extend(line.removeprefix("data: ") for line in response.iter_lines() if line)

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: any(r["in_flight"] for r in running_replicas(ray_server)), "a replica generates", 30)
    serving = next(r for r in running_replicas(ray_server) if r["in_flight"])
    os.kill(serving["pid"], signal.SIGKILL)
    reader.join(timeout=60)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "replica_unavailable" and "Ray Serve is starting a new one" in error["message"]

    answer = client.chat.completions.create(model=SMOL, messages=COUNTING, max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason == "length"  # the other replica serves meanwhile

    def replaced() -> bool:
        replicas = running_replicas(ray_server)
        return len(replicas) == 2 and serving["replica"] not in {r["replica"] for r in replicas}

    wait_until(replaced, "Serve replaced the killed replica", 90)


def test_unload_removes_the_replicas_and_a_request_deploys_again(client: Any, ray_server: ServerProcess) -> None:
    pids = [r["pid"] for r in running_replicas(ray_server)]
    assert len(pids) == 2
    unloaded = httpx.post(f"{ray_server.base_url}/admin/api/models/{SMOL}/unload", timeout=120).json()
    assert unloaded["state"] == "unloaded" and "replicas" not in unloaded
    wait_until(lambda: not any(alive(pid) for pid in pids), "the replicas' processes ended", 60)
    assert SMOL not in httpx.get(f"{ray_server.base_url}/health").json()["loaded"]

    answer = client.chat.completions.create(model=SMOL, messages=COUNTING, max_tokens=4)  # deploys it again
    assert answer.usage.completion_tokens == 4
    assert len(running_replicas(ray_server)) == 2


def test_registry_checks_the_replica_keys() -> None:
    registry = ModelRegistry.from_list(
        [
            smol_entry("a", replicas=0),
            smol_entry("b", autoscaling={"min": 2, "max": 1}),
            smol_entry("c", replicas=2, autoscaling={"min": 1, "max": 2}),
            smol_entry("d", autoscaling={"min": 0, "max": 3}),
        ]
    )
    a, b, c, d = registry.entries
    assert [p.key for p in a.errors] == ["replicas"] and [p.key for p in b.errors] == ["autoscaling"]
    assert [p.key for p in c.errors] == ["replicas"] and d.is_served


def test_concurrency_counts_every_replica() -> None:
    from backends import LoadOptions, ModelSpec
    from proxy.ray_serve import RayCluster

    options = LoadOptions(parallel=3)
    assert RayCluster.concurrency_of(ModelSpec.from_dict(smol_entry(replicas=2)), options) == 6
    assert RayCluster.concurrency_of(ModelSpec.from_dict(smol_entry(autoscaling={"min": 0, "max": 4})), options) == 12
