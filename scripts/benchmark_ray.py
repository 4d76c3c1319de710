"""On-demand benchmark of the Ray Serve path (``clemproxy serve --ray local``) against the single process: what a
request pays for going through a Serve deployment. Ratios, in one run on one machine (not a test).

    .venv/bin/python scripts/benchmark_ray.py [--tokens 64] [--threads 2] [--repeats 3]

On the demo model (SmolLM2-135M-Instruct, Q4_1 GGUF, llama.cpp), greedy, streamed: time to first token and
tokens/s of one stream and of four concurrent ones, through ``clemproxy serve`` as one process, then through
``clemproxy serve --ray local`` with the model deployed as one replica (same engine, same threads). The two
servers run one after the other, so that neither's idle processes slow the other; the client shares the
machine with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_llamacpp import Server

from tests.support import COUNTING, SMOL, smol_entry


async def stream(client: Any, tokens: int) -> tuple[float, float, int]:
    """(time to first token, wall time, tokens) of one greedy streamed chat completion. Tokens are the usage's,
    not the chunks': the Ray path sends several tokens per chunk."""
    started = time.perf_counter()
    first = 0.0
    count = 0
    response = await client.chat.completions.create(
        model=SMOL,
        messages=COUNTING,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return first, time.perf_counter() - started, count


async def measure(url: str, tokens: int, repeats: int) -> dict[str, float]:
    """Medians over ``repeats`` of: one stream's TTFT and tokens/s; four streams' mean TTFT and total tokens/s."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    await stream(client, 8)  # loaded and warm
    found: dict[str, list[float]] = {"ttft_1": [], "rate_1": [], "ttft_4": [], "rate_4": []}
    for _ in range(repeats):
        first, wall, count = await stream(client, tokens)
        found["ttft_1"].append(first)
        found["rate_1"].append(count / wall)
        started = time.perf_counter()
        results = await asyncio.gather(*(stream(client, tokens) for _ in range(4)))
        found["ttft_4"].append(statistics.mean(r[0] for r in results))
        found["rate_4"].append(sum(r[2] for r in results) / (time.perf_counter() - started))
    await client.close()
    return {key: statistics.median(values) for key, values in found.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="clemproxy-bench-ray-"))
    registry = folder / "model_registry.json"
    registry.write_text(json.dumps([smol_entry(replicas=1)]), encoding="utf-8")
    figures: dict[str, dict[str, float]] = {}
    for path, flags in (("single process", ()), ("Ray Serve", ("--ray", "local"))):
        server = Server(args.threads, "--registry", str(registry), "--preload", SMOL, *flags, start_timeout=300)
        try:
            figures[path] = asyncio.run(measure(server.url, args.tokens, args.repeats))
        finally:
            server.stop()
    single, ray = figures["single process"], figures["Ray Serve"]
    print(f"{args.tokens} tokens, --threads {args.threads}, medians of {args.repeats}")
    print("| | single process | Ray Serve, 1 replica | Ray over single |")
    print("| --- | --- | --- | --- |")
    for key, label, unit in (
        ("ttft_1", "time to first token, 1 stream", "ms"),
        ("rate_1", "tokens/s, 1 stream", ""),
        ("ttft_4", "time to first token, 4 streams (mean)", "ms"),
        ("rate_4", "tokens/s, 4 streams (total)", ""),
    ):
        scale = 1000 if unit == "ms" else 1
        print(
            f"| {label} | {single[key] * scale:.1f}{' ' + unit if unit else ''} | "
            f"{ray[key] * scale:.1f}{' ' + unit if unit else ''} | {ray[key] / single[key]:.2f}× |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
