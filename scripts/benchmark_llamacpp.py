"""On-demand benchmark of the llama.cpp engine: ratios, in one run on one machine (not a test).

    .venv/bin/python scripts/benchmark_llamacpp.py [--tokens 64] [--threads 1,2] [--turns 4] [--skip-dialogues]

On the demo model (SmolLM2-135M-Instruct, Q4_1 GGUF), greedy, streamed:

- one stream through ``clemproxy serve`` against llama-cpp-python in-process with every core (``n_threads`` =
  all), what a user would otherwise run; for each ``--threads`` value the server is started with;
- aggregate tokens/s of 4 and 8 concurrent streams over one stream;
- interleaved dialogues, K = 2 and 4, each opening with about 1,400 tokens of game rules and taking turns:
  time to first token of the later turns over the first turn's, with each dialogue's own rules, and with the
  same rules for all (the others' first turn over the first dialogue's); llama-cpp-python in-process, which
  keeps only the previous request's prefix, for comparison.

The server runs as a separate process, as users run it; the client shares the machine with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backends.llamacpp.model import build_has_amx  # noqa: E402
from tests.support import COUNTING, SMOL, free_port, in_process_llama, smollm2_gguf  # noqa: E402

CORES = os.cpu_count() or 1


def rules(variant: str) -> str:
    """About 1,400 tokens of game rules; ``variant`` makes them a dialogue's own (it comes first)."""
    lines = [f"Game {variant}. You are playing a word game with another player."] + [
        f"Rule {n}: when the other player says a word starting with the letter {chr(97 + n % 26)}, you answer "
        f"with a word of {3 + n % 5} letters that starts with the letter after it, and you never repeat a word."
        for n in range(1, 46)
    ]
    return " ".join(lines)


class Server:
    """``clemproxy serve`` on the bundled registry (or as ``flags`` say), in a process of its own."""

    def __init__(self, threads: int, *flags: str, start_timeout: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="clemproxy-bench-", suffix=".log", delete=False)  # noqa: SIM115
        command = [sys.executable, "-m", "proxy.cli", "serve", "--port", str(self.port), "--threads", str(threads)]
        command += flags
        env = {**os.environ, "CLEMPROXY_LOG_LEVEL": "warning"}
        self.process = subprocess.Popen(command, cwd=tempfile.gettempdir(), env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {self.log.name}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


async def stream(client: Any, model: str, messages: list[dict[str, str]], tokens: int) -> tuple[float, float, int]:
    """(time to first token, wall time, tokens) of one greedy streamed chat completion."""
    started = time.perf_counter()
    first = 0.0
    count = 0
    response = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=tokens, temperature=0, stream=True
    )
    async for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
            count += 1
    return first, time.perf_counter() - started, count


async def served_rate(client: Any, tokens: int, concurrent: int) -> float:
    """Aggregate tokens/s of ``concurrent`` simultaneous streams through the server."""
    started = time.perf_counter()
    results = await asyncio.gather(*(stream(client, SMOL, COUNTING, tokens) for _ in range(concurrent)))
    return sum(count for _, _, count in results) / (time.perf_counter() - started)


def in_process_rate(llm: Any, tokens: int) -> float:
    """tokens/s of llama-cpp-python's own streamed chat completion, the same request."""
    started = time.perf_counter()
    count = 0
    for chunk in llm.create_chat_completion(messages=COUNTING, max_tokens=tokens, temperature=0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            count += 1
    return count / (time.perf_counter() - started)


async def streams_against(url: str, llm: Any, tokens: int, repeats: int) -> dict[str, float]:
    """Median ratios, each measured back to back so that a busy moment of the machine hits both sides: one
    stream over in-process llama-cpp-python, and 4 and 8 concurrent streams over one."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    await served_rate(client, 8, 1)  # loaded and warm
    in_process_rate(llm, 8)
    ratios: dict[str, list[float]] = {"one": [], "4": [], "8": []}
    rates: dict[str, list[float]] = {"alone": [], "one": [], "4": [], "8": []}
    for _ in range(repeats):
        alone, one = in_process_rate(llm, tokens), await served_rate(client, tokens, 1)
        four, eight = await served_rate(client, tokens, 4), await served_rate(client, tokens, 8)
        for key, value in (("alone", alone), ("one", one), ("4", four), ("8", eight)):
            rates[key].append(value)
        ratios["one"].append(one / alone)
        ratios["4"].append(four / one)
        ratios["8"].append(eight / one)
    await client.close()
    medians = {f"{key}_rate": statistics.median(values) for key, values in rates.items()}
    return {**medians, **{key: statistics.median(values) for key, values in ratios.items()}}


Ask = Callable[[list[dict[str, str]]], Awaitable[tuple[float, str]]]


async def take_turns(ask: Ask, histories: list[list[dict[str, str]]], turns: int) -> tuple[list[float], list[float]]:
    """Dialogues taking turns; the time to first token of every first turn, and of all later turns."""
    first, later = [], []
    for turn in range(turns):
        for d, history in enumerate(histories):
            history.append({"role": "user", "content": f"Player {d}, turn {turn}: my word is apple. Yours?"})
            ttft, text = await ask(history)
            history.append({"role": "assistant", "content": text})
            (first if turn == 0 else later).append(ttft)
    return first, later


def dialogue_openings(dialogues: int, same_rules: bool) -> list[list[dict[str, str]]]:
    """Each dialogue's system prompt; the rules name the run, so that no run finds an earlier one in the cache."""
    run = f"{dialogues}{'S' if same_rules else 'O'}"
    return [[{"role": "system", "content": rules(run if same_rules else f"{run}-{d}")}] for d in range(dialogues)]


async def served_dialogues(url: str, dialogues: int, turns: int, same_rules: bool) -> tuple[list[float], list[float]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    async def ask(history: list[dict[str, str]]) -> tuple[float, str]:
        started = time.perf_counter()
        text, ttft = "", 0.0
        response = await client.chat.completions.create(
            model=SMOL, messages=history, max_tokens=16, temperature=0, stream=True
        )
        async for chunk in response:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - started
                text += chunk.choices[0].delta.content
        return ttft, text

    try:
        return await take_turns(ask, dialogue_openings(dialogues, same_rules), turns)
    finally:
        await client.close()


def in_process_dialogues(llm: Any, dialogues: int, turns: int) -> tuple[list[float], list[float]]:
    async def ask(history: list[dict[str, str]]) -> tuple[float, str]:
        started = time.perf_counter()
        text, ttft = "", 0.0
        for chunk in llm.create_chat_completion(messages=history, max_tokens=16, temperature=0, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                ttft = ttft or time.perf_counter() - started
                text += chunk["choices"][0]["delta"]["content"]
        return ttft, text

    return asyncio.run(take_turns(ask, dialogue_openings(dialogues, same_rules=False), turns))


def llama_cpp_batched_decode(concurrent: int, threads: int, steps: int = 30) -> float:
    """tokens/s of llama.cpp's own decode of ``concurrent`` sequences a token each per step, without a server,
    sampling or Python per token: the ceiling any batching server on this machine works under."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = not build_has_amx()  # AMX's repacked weights crash on prompt batches (see README)
    model = LlamaModel(path_model=str(smollm2_gguf()), params=params, verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 4096 * 4, 512, 512, 8
    params.kv_unified, params.n_threads, params.n_threads_batch = True, threads, threads
    ctx = llama_cpp.llama_init_from_model(model.model, params)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(tokens: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        assert llama_cpp.llama_decode(ctx, batch) == 0

    for seq in range(concurrent):
        decode([(100 + i, i, seq, i == 39) for i in range(40)])
    started = time.perf_counter()
    for step in range(steps):
        decode([(200 + step, 40 + step, seq, True) for seq in range(concurrent)])
    rate = concurrent * steps / (time.perf_counter() - started)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    model.close()
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5, help="back-to-back rounds; medians are reported")
    parser.add_argument(
        "--threads", default=",".join(str(n) for n in sorted({1, CORES})), help="server --threads values"
    )
    parser.add_argument("--turns", type=int, default=4, help="turns per dialogue")
    parser.add_argument("--skip-dialogues", action="store_true")
    args = parser.parse_args()
    print(f"machine: {CORES} cores; demo model {smollm2_gguf().name}; greedy, streamed, {args.tokens} tokens")
    llm = in_process_llama(n_ctx=4096, n_threads=CORES, n_threads_batch=CORES)
    thread_counts = [int(t) for t in args.threads.split(",")]
    for threads in thread_counts:
        ceiling: dict[int, list[float]] = {1: [], 4: [], 8: []}
        for _ in range(args.repeats):
            for n in ceiling:
                ceiling[n].append(llama_cpp_batched_decode(n, threads))
        four, eight = (statistics.median(c) / statistics.median(ceiling[1]) for c in (ceiling[4], ceiling[8]))
        print(
            f"llama.cpp's own batched decode, {threads} threads (no server, no sampling: the ceiling here): "
            f"4 sequences {four:.2f} x one, 8 sequences {eight:.2f} x one"
        )
        server = Server(threads)
        try:
            result = asyncio.run(streams_against(server.url, llm, args.tokens, args.repeats))
        finally:
            server.stop()
        print(
            f"clemproxy --threads {threads}: 1 stream {result['one_rate']:.1f} tokens/s against "
            f"{result['alone_rate']:.1f} in-process (n_threads={CORES}) = {result['one']:.2f} x; "
            f"4 streams {result['4_rate']:.1f} = {result['4']:.2f} x one; "
            f"8 streams {result['8_rate']:.1f} = {result['8']:.2f} x one"
        )
    if args.skip_dialogues:
        return 0
    server = Server(max(thread_counts))
    try:
        for k in (2, 4):
            first, later = asyncio.run(served_dialogues(server.url, k, args.turns, same_rules=False))
            ratio = statistics.median(later) / statistics.median(first)
            print(
                f"clemproxy, {k} dialogues, own rules: first turn {statistics.median(first):.2f} s, later turns "
                f"{statistics.median(later):.2f} s = {ratio:.2f} x the first"
            )
            first, _ = asyncio.run(served_dialogues(server.url, k, 1, same_rules=True))
            print(
                f"clemproxy, {k} dialogues, same rules: first dialogue's first turn {first[0]:.2f} s, the others' "
                f"{statistics.median(first[1:]):.2f} s = {statistics.median(first[1:]) / first[0]:.2f} x"
            )
    finally:
        server.stop()
    for k in (2, 4):
        first, later = in_process_dialogues(llm, k, args.turns)
        print(
            f"llama-cpp-python in-process, {k} dialogues: first turn {statistics.median(first):.2f} s, later turns "
            f"{statistics.median(later):.2f} s = {statistics.median(later) / statistics.median(first):.2f} x the first"
        )
    llm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
