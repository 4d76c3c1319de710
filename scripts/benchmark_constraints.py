"""On-demand benchmark of constrained decoding: what a ``json_schema`` costs, as ratios, in one run (not a test).

    .venv/bin/python scripts/benchmark_constraints.py [--tokens 96] [--repeats 3] [--threads 2]

On the bundled registry's demo model on both backends (SmolLM2-135M-Instruct: the Q4_1 GGUF through llama.cpp,
and the same file dequantised by transformers), greedy, streamed through ``clemproxy serve``:

- decode tokens/s (after the first token) of a ``response_format: json_schema`` request over the same request
  without it, one stream and four at once (the four constrained together, each with its own matcher);
- the grammar's first compilation against a later one of the same schema (the model's cache).

The schema is a list of words without a bound, so greedy decoding writes until ``max_tokens``, as the free
request does.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_llamacpp import Server

from tests.support import SMOL, SMOL_HF_GGUF

SCHEMA = {
    "type": "object",
    "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 12}}},
    "required": ["words"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "words", "schema": SCHEMA}}
MESSAGES = [{"role": "user", "content": "List as many English words about the sea as you can, as JSON."}]


async def decode_rate(client: Any, model: str, tokens: int, constrained: bool) -> tuple[float, float]:
    """(decode tokens/s after the first token, seconds to the first token) of one greedy stream."""
    extra = {"response_format": FORMAT} if constrained else {}
    started = time.perf_counter()
    first = last = 0.0
    used = 0
    response = await client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    async for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    return (used - 1) / (last - first), first - started


async def aggregate_rate(client: Any, model: str, tokens: int, constrained: bool, streams: int) -> float:
    results = await asyncio.gather(*(decode_rate(client, model, tokens, constrained) for _ in range(streams)))
    return sum(rate for rate, _ in results)


async def measure(url: str, model: str, tokens: int, repeats: int) -> dict[str, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600)
    await decode_rate(client, model, 8, constrained=False)  # loads the model
    started = time.perf_counter()
    await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1, response_format=FORMAT)
    first_compile = time.perf_counter() - started
    started = time.perf_counter()
    await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1, response_format=FORMAT)
    second_compile = time.perf_counter() - started
    figures: dict[str, list[float]] = {}
    for _ in range(repeats):
        for constrained in (False, True):
            kind = "json_schema" if constrained else "free"
            figures.setdefault(f"{kind} 1", []).append((await decode_rate(client, model, tokens, constrained))[0])
            figures.setdefault(f"{kind} 4", []).append(await aggregate_rate(client, model, tokens, constrained, 4))
    result = {name: statistics.median(values) for name, values in figures.items()}
    result["first request with the schema (s)"] = first_compile
    result["second request with the schema (s)"] = second_compile
    await client.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp's threads (0: every core)")
    args = parser.parse_args()
    server = Server(args.threads or 0)
    try:
        for model in (SMOL, SMOL_HF_GGUF):
            result = asyncio.run(measure(server.url, model, args.tokens, args.repeats))
            print(f"\n{model}")
            for streams in (1, 4):
                free, constrained = result[f"free {streams}"], result[f"json_schema {streams}"]
                print(
                    f"  {streams} stream(s): free {free:.1f} tok/s, json_schema {constrained:.1f} tok/s, "
                    f"ratio {constrained / free:.2f}"
                )
            print(
                f"  a 1-token request with the schema: first {result['first request with the schema (s)']:.3f} s, "
                f"second {result['second request with the schema (s)']:.3f} s"
            )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
