"""On-demand benchmark of the worker processes: ratios, in one run on one machine (not a test).

    .venv/bin/python scripts/benchmark_workers.py [--tokens 128] [--repeats 3] [--cycles 10]

On the bundled registry's two demo models (SmolLM2-135M-Instruct as a Q4_1 GGUF through llama.cpp, and the
same GGUF dequantised for transformers), greedy, streamed, each server a process of its own:

- IPC: 1 and 4 concurrent streams through ``clemproxy serve`` (every model in a worker process), over the same
  through ``clemproxy serve --no-worker-processes`` (the engines in the server's process), both backends;
- a shared machine: one GGUF stream's tokens/s while a plain busy loop (another program) holds one core, over
  the same on the quiet machine; and the same with a transformers stream and a GGUF stream both generating;
  with the thread budget following the load (the default) and without (``--no-threads-follow-load``);
- memory: the server's resident memory after ``--cycles`` load/unload cycles of both models, over its resident
  memory before the first load (after one look at the admin page, which asks the backends about GPUs).

Say how quiet the machine was: this prints /proc/loadavg before it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmark_llamacpp import Server, stream  # noqa: E402

from tests.support import COUNTING, SMOL, SMOL_HF_GGUF  # noqa: E402

CORES = os.cpu_count() or 1


def resident(pid: int) -> int:
    with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def rate(client: Any, models: list[str], tokens: int) -> float:
    """Aggregate tokens/s of one stream per entry of ``models``, all at once."""
    started = time.perf_counter()
    results = await asyncio.gather(*(stream(client, model, COUNTING, tokens) for model in models))
    return sum(count for _, _, count in results) / (time.perf_counter() - started)


def client_of(server: Server) -> Any:
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)


async def throughput(flags: list[str], tokens: int, repeats: int) -> dict[str, float]:
    server = Server(0, *flags)
    try:
        client = client_of(server)
        figures: dict[str, float] = {}
        for model in (SMOL, SMOL_HF_GGUF):
            await rate(client, [model], 8)  # loaded and warm
            for streams in (1, 4):
                runs = [await rate(client, [model] * streams, tokens) for _ in range(repeats)]
                figures[f"{model} x{streams}"] = statistics.median(runs)
        return figures
    finally:
        server.stop()


class BusyLoop:
    """A plain busy loop on one core: another program sharing the machine."""

    def __enter__(self) -> BusyLoop:
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setaffinity(self.process.pid, {0})
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.kill()
        self.process.wait()


async def shared_machine(tokens: int, repeats: int, *flags: str) -> dict[str, float]:
    server = Server(0, *flags)
    try:
        client = client_of(server)
        await rate(client, [SMOL, SMOL_HF_GGUF], 8)
        figures: dict[str, float] = {}
        for label, models in (("GGUF alone", [SMOL]), ("GGUF and transformers", [SMOL, SMOL_HF_GGUF])):
            quiet = statistics.median([await rate(client, models, tokens) for _ in range(repeats)])
            with BusyLoop():
                await asyncio.sleep(2.5)  # the budget follows the load a second or two later
                busy = statistics.median([await rate(client, models, tokens) for _ in range(repeats)])
            figures[f"{label}: quiet tokens/s"] = quiet
            figures[f"{label}: one core busy tokens/s"] = busy
            figures[f"{label}: ratio"] = busy / quiet
        return figures
    finally:
        server.stop()


def memory_cycles(cycles: int) -> dict[str, float]:
    server = Server(0)
    try:
        admin = f"{server.url}/admin/api/models"
        httpx.get(f"{server.url}/admin", timeout=120)  # the page asks the backends about GPUs once
        httpx.get(admin, timeout=60)
        before = resident(server.process.pid)
        for _ in range(cycles):
            for model in (SMOL, SMOL_HF_GGUF):
                httpx.post(f"{admin}/{model}/load", timeout=600).raise_for_status()
                body = {"model": model, "messages": COUNTING, "max_tokens": 8, "temperature": 0}
                httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=600).raise_for_status()
            for model in (SMOL, SMOL_HF_GGUF):
                httpx.post(f"{admin}/{model}/unload", timeout=600).raise_for_status()
        after = resident(server.process.pid)
        return {"before MiB": before / 2**20, "after MiB": after / 2**20, "ratio": after / before}
    finally:
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=10)
    args = parser.parse_args()
    print(f"cores: {CORES}; /proc/loadavg before: {Path('/proc/loadavg').read_text().strip()}")

    workers = await throughput([], args.tokens, args.repeats)
    in_process = await throughput(["--no-worker-processes"], args.tokens, args.repeats)
    print("\nIPC: through worker processes over the engines in the server's process (tokens/s)")
    for key in workers:
        print(f"  {key:36s} {workers[key]:7.1f} / {in_process[key]:7.1f} = {workers[key] / in_process[key]:.2f}")

    print("\nA shared machine: one core held by a busy loop, over quiet (tokens/s, all streams together)")
    configurations = (
        ("the default: threads follow the load", args.tokens, args.repeats, ()),
        # Without it the busy side crawls (a fraction of a token a second): fewer tokens, one round.
        ("--no-threads-follow-load", 16, 1, ("--no-threads-follow-load",)),
    )
    for label, tokens, repeats, flags in configurations:
        print(f" {label}")
        for key, value in (await shared_machine(tokens, repeats, *flags)).items():
            print(f"  {key:45s} {value:7.2f}")

    print(f"\nMemory: the server's resident memory after {args.cycles} load/unload cycles of both models")
    for key, value in memory_cycles(args.cycles).items():
        print(f"  {key:12s} {value:8.2f}")
    print(f"\n/proc/loadavg after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    asyncio.run(main())
