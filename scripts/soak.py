"""Soak test, run on demand (not part of the test suite): many concurrent clients against a real clemproxy.

    .venv/bin/python scripts/soak.py [--seconds 60] [--clients 16] [--model SmolLM2-135M-Instruct-GGUF]

Starts ``clemproxy serve`` on the bundled registry in a subprocess, guarded by an API key and an admin key,
then runs ``--clients`` clients for ``--seconds``. Each request is, at random: a streamed chat completion
read to the end; one whose client disconnects after a few chunks; a non-streamed one; a malformed body; or
one without the API key. It reports requests by outcome, the server's RSS at the start (model loaded) and
the end, whether the server still answers, and its exit code after SIGTERM.
Exits 1 if a well-formed request got anything but 200 or a 503 with Retry-After, a keyless one anything
but 401, or the server died or did not exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MALFORMED = [b"{not json", b"[1, 2]", b'{"model": 7, "messages": []}', b'{"messages": [{"role": "robot"}]}']
# The server runs guarded, as a shared one would: clients send the API key, a share of them none.
API_KEY = secrets.token_hex(16)
ADMIN_KEY = secrets.token_hex(16)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def rss(client: httpx.AsyncClient) -> int:
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    return int((await client.get("/admin/api/models", headers=admin)).json()["process"]["rss_bytes"])


async def one_request(
    client: httpx.AsyncClient, model: str, rng: random.Random, outcomes: collections.Counter[str]
) -> None:
    kind = rng.choices(["stream", "disconnect", "whole", "malformed", "no key"], weights=[5, 2, 2, 1, 1])[0]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": rng.choice(["Name three colors.", "Count to twenty.", "Say hi."])}],
        "max_tokens": rng.randint(8, 48),
        "temperature": rng.choice([0, 0.7]),
    }
    if kind == "no key":
        response = await client.post("/v1/chat/completions", json=body, headers={"authorization": ""})
        outcomes[f"no key -> {response.status_code}"] += 1
        return
    if kind == "malformed":
        response = await client.post("/v1/chat/completions", content=rng.choice(MALFORMED))
        outcomes[f"malformed -> {response.status_code}"] += 1
        return
    if kind == "whole":
        response = await client.post("/v1/chat/completions", json=body)
        outcomes[f"whole -> {response.status_code}{retry_after(response)}"] += 1
        return
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            outcomes[f"{kind} -> {response.status_code}{retry_after(response)}"] += 1
            return
        chunks, done = 0, False
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {"):
                chunks += 1
                if "error" in json.loads(line[6:]):
                    outcomes[f"{kind} -> error event"] += 1
            if kind == "disconnect" and chunks >= 3:
                outcomes["disconnect -> left mid-stream"] += 1
                return
        outcomes[f"{kind} -> 200 {'complete' if done else 'TRUNCATED'}"] += 1


def retry_after(response: httpx.Response) -> str:
    return " with Retry-After" if response.status_code == 503 and "retry-after" in response.headers else ""


async def client_loop(
    base_url: str, model: str, deadline: float, seed: int, outcomes: collections.Counter[str]
) -> None:
    rng = random.Random(seed)
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=base_url, timeout=120, headers=headers) as client:
        while time.monotonic() < deadline:
            overloaded = sum(n for outcome, n in outcomes.items() if "503" in outcome)
            try:
                await one_request(client, model, rng, outcomes)
            except httpx.HTTPError as exc:
                outcomes[f"client error {type(exc).__name__}"] += 1
            if sum(n for outcome, n in outcomes.items() if "503" in outcome) > overloaded:
                await asyncio.sleep(rng.uniform(0.1, 0.5))  # a polite client backs off when told to retry later


async def soak(base_url: str, model: str, seconds: float, clients: int) -> tuple[collections.Counter[str], int, int]:
    outcomes: collections.Counter[str] = collections.Counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        await client.post(f"/admin/api/models/{model}/load", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        start_rss = await rss(client)
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(client_loop(base_url, model, deadline, seed, outcomes) for seed in range(clients)))
        end_rss = await rss(client)
    return outcomes, start_rss, end_rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct-GGUF")
    args = parser.parse_args()
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CLEMPROXY_API_KEY": API_KEY, "CLEMPROXY_ADMIN_KEY": ADMIN_KEY}
    server = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # a pipe nobody reads would fill up and block the server
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        started = time.monotonic()
        outcomes, start_rss, end_rss = asyncio.run(soak(base_url, args.model, args.seconds, args.clients))
        elapsed = time.monotonic() - started
        alive = server.poll() is None and httpx.get(f"{base_url}/health", timeout=5).status_code == 200
    finally:
        server.terminate()  # SIGTERM: a graceful stop exits 0
        exit_code = server.wait(timeout=60)
    total = sum(outcomes.values())
    print(f"{total} requests from {args.clients} clients in {elapsed:.0f} s against {args.model}")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {count:6d}  {outcome}")
    print(f"server RSS with the model loaded: {start_rss >> 20} MiB at the start, {end_rss >> 20} MiB at the end")
    print(f"server still answering: {alive}; exit code after SIGTERM: {exit_code}")
    bad = [o for o in outcomes if "TRUNCATED" in o or "client error" in o or ("-> 5" in o and "Retry-After" not in o)]
    bad += [o for o in outcomes if o.startswith(("stream", "whole")) and "-> 4" in o]
    bad += [o for o in outcomes if o.startswith("no key") and "-> 401" not in o]
    if bad or not alive or exit_code != 0:
        print(f"FAILED: {bad or 'server not answering'}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
