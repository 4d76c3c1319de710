"""On-demand benchmark of the transformers engine against ``transformers serve``: ratios, in one run on one
machine (not a test).

    .venv/bin/python scripts/benchmark_transformers.py --transformers-serve PATH [--tokens 64] [--repeats 3]

``transformers serve`` is what a user would otherwise run; it needs ``transformers[serving]``, which this
project does not install into its own environment: give the path of its ``transformers`` command in another
(``make bench-env`` builds one in ``.venv-bench``). All servers serve the same float32 weights, the demo model
dequantised into a transformers checkpoint, as separate processes on this machine; the client shares it.

- one stream and 4 concurrent streams (aggregate tokens/s), greedy, streamed: clemproxy ``huggingface_local``
  (float32, the default, and with ``dtype: bfloat16``) against ``transformers serve`` and
  ``transformers serve --continuous-batching``. Each round asks every server in turn, so that a busy moment of
  the machine hits all of them; medians are reported. Tokens are the streamed text re-tokenised.
- interleaved dialogues, K = 2 and 4, each opening with about 1,400 tokens of game rules and taking turns: time
  to first token of the later turns over the first turn's, on clemproxy and on ``transformers serve``.
- the Responses API (``/v1/responses``, streamed): one stream's tokens/s on clemproxy and ``transformers serve``;
  and 2 interleaved dialogues of the same kind, on clemproxy continued by ``previous_response_id`` (only the new
  turn is sent) or resent whole as input items, and on ``transformers serve`` resent whole (it keeps no
  responses): the later turns' time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import benchmark_llamacpp  # noqa: E402
from benchmark_llamacpp import dialogue_openings, take_turns  # noqa: E402

from tests.support import free_port, smol_hf_entry, smollm2_safetensors_dir, write_registry  # noqa: E402

CORES = os.cpu_count() or 1
COUNTING = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]


class Served:
    """One server process, started and stopped by this script (by its own PID)."""

    def __init__(self, label: str, command: list[str], model: str, env: dict[str, str] | None = None) -> None:
        self.label = label
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)],
            cwd=tempfile.gettempdir(),
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{label} did not start; see {self.log.name}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def stream(client: Any, model: str, messages: list[dict[str, str]], tokens: int) -> tuple[float, str]:
    """(time to first token, text) of one greedy streamed chat completion."""
    started = time.perf_counter()
    first, text = 0.0, ""
    response = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=tokens, temperature=0, stream=True
    )
    async for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
            text += chunk.choices[0].delta.content
    return first, text


async def rate(server: Served, tokenizer: Any, tokens: int, concurrent: int) -> float:
    """Aggregate tokens/s of ``concurrent`` simultaneous streams."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=900) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream(client, server.model, COUNTING, tokens) for _ in range(concurrent)))
        elapsed = time.perf_counter() - started
    return sum(len(tokenizer(text, add_special_tokens=False).input_ids) for _, text in results) / elapsed


async def dialogues(server: Served, k: int, turns: int) -> tuple[list[float], list[float]]:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=900) as client:

        async def ask(history: list[dict[str, str]]) -> tuple[float, str]:
            return await stream(client, server.model, history, 16)

        return await take_turns(ask, dialogue_openings(k, same_rules=False), turns)


async def respond(client: Any, model: str, given: Any, tokens: int, **more: Any) -> tuple[float, str, str]:
    """(time to first token, text, response id) of one greedy streamed response."""
    started = time.perf_counter()
    first, text, response_id = 0.0, "", ""
    events = await client.responses.create(
        model=model, input=given, max_output_tokens=tokens, temperature=0, stream=True, **more
    )
    async for event in events:
        if event.type == "response.output_text.delta" and event.delta:
            first = first or time.perf_counter() - started
            text += event.delta
        elif event.type in ("response.completed", "response.incomplete"):
            response_id = event.response.id
    return first, text, response_id


async def responses_rate(server: Served, tokenizer: Any, tokens: int) -> float:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=900) as client:
        started = time.perf_counter()
        _, text, _ = await respond(client, server.model, COUNTING[0]["content"], tokens)
        elapsed = time.perf_counter() - started
    return len(tokenizer(text, add_special_tokens=False).input_ids) / elapsed


async def responses_dialogues(server: Served, k: int, turns: int, stored: bool) -> tuple[list[float], list[float]]:
    """Dialogues taking turns on the Responses API: ``stored`` sends each turn with ``previous_response_id``,
    otherwise the whole conversation is sent again as input items. Each call has rules of its own, so that no
    call finds an earlier one's dialogues in the cache."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=900) as client:
        run = f"responses-{'stored' if stored else 'resent'}-{server.label}"
        rules = [benchmark_llamacpp.rules(f"{run}-{d}") for d in range(k)]
        previous: list[str | None] = [None] * k
        items: list[list[dict[str, str]]] = [[] for _ in range(k)]
        first, later = [], []
        for turn in range(turns):
            for d in range(k):
                say = f"Player {d}, turn {turn}: my word is apple. Yours?"
                if stored:
                    more = {"previous_response_id": previous[d]} if previous[d] else {}
                    ttft, _, previous[d] = await respond(client, server.model, say, 16, instructions=rules[d], **more)
                else:
                    items[d].append({"role": "user", "content": say})
                    ttft, text, _ = await respond(client, server.model, items[d], 16, instructions=rules[d])
                    items[d].append({"role": "assistant", "content": text})
                (first if turn == 0 else later).append(ttft)
        return first, later


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--transformers-serve",
        required=True,
        help="the transformers command of an environment "
        "with transformers[serving] (e.g. .venv-bench/bin/transformers)",
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all servers; medians are reported")
    parser.add_argument("--turns", type=int, default=4, help="turns per dialogue")
    parser.add_argument("--skip-dialogues", action="store_true")
    parser.add_argument("--skip-responses", action="store_true", help="leave out the Responses API's figures")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    checkpoint = smollm2_safetensors_dir()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    registry = write_registry(
        Path(tempfile.mkdtemp(prefix="bench-registry-")) / "model_registry.json",
        [smol_hf_entry("smol-hf", checkpoint), smol_hf_entry("smol-hf-bf16", checkpoint, dtype="bfloat16")],
    )
    print(f"machine: {CORES} cores; SmolLM2-135M-Instruct, float32 checkpoint {checkpoint.name}")
    print(f"greedy, streamed, {args.tokens} tokens; medians of {args.repeats} rounds")
    clemproxy = [sys.executable, "-m", "proxy.cli", "serve", "--registry", str(registry), "--data-dir", ":memory:"]
    quiet = {"CLEMPROXY_LOG_LEVEL": "warning"}
    command = str(Path(args.transformers_serve).absolute())
    tserve = [command, "serve", str(checkpoint), "--device", "cpu", "--dtype", "float32"]
    servers: list[Served] = []
    try:
        servers.append(Served("clemproxy float32", clemproxy, "smol-hf", quiet))
        servers.append(Served("clemproxy bfloat16", clemproxy, "smol-hf-bf16", quiet))
        servers.append(Served("transformers serve", tserve, str(checkpoint)))
        cb = [*tserve, "--continuous-batching"]
        servers.append(Served("transformers serve --continuous-batching", cb, str(checkpoint)))
        for server in servers:  # loaded and warm
            asyncio.run(rate(server, tokenizer, 8, 1))
            asyncio.run(rate(server, tokenizer, 8, 4))
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):
            for concurrent in (1, 4):
                for server in servers:
                    value = asyncio.run(rate(server, tokenizer, args.tokens, concurrent))
                    rates.setdefault((server.label, concurrent), []).append(value)
        median = {key: statistics.median(values) for key, values in rates.items()}
        for concurrent in (1, 4):
            for server in servers:
                print(f"{server.label:42s} {concurrent} stream(s): {median[(server.label, concurrent)]:6.1f} tokens/s")
        plain, cb = "transformers serve", "transformers serve --continuous-batching"
        for label in ("clemproxy float32", "clemproxy bfloat16"):
            print(
                f"{label}: 1 stream {median[(label, 1)] / median[(plain, 1)]:.2f} x {plain}; "
                f"4 streams {median[(label, 4)] / median[(cb, 4)]:.2f} x {cb}, "
                f"{median[(label, 4)] / median[(plain, 4)]:.2f} x {plain}"
            )
        if not args.skip_dialogues:
            for server in (servers[0], servers[2]):
                for k in (2, 4):
                    first, later = asyncio.run(dialogues(server, k, args.turns))
                    print(
                        f"{server.label}, {k} dialogues: first turn {statistics.median(first):.2f} s, later turns "
                        f"{statistics.median(later):.2f} s = {statistics.median(later) / statistics.median(first):.2f}"
                        " x the first"
                    )
        if not args.skip_responses:
            measured = {label: [] for label in ("clemproxy float32", "transformers serve")}
            for _ in range(args.repeats):
                for server in (servers[0], servers[2]):
                    measured[server.label].append(asyncio.run(responses_rate(server, tokenizer, args.tokens)))
            ours, theirs = (statistics.median(measured[label]) for label in measured)
            print(
                f"Responses API, 1 stream: clemproxy float32 {ours:.1f} tokens/s, transformers serve "
                f"{theirs:.1f} tokens/s = {ours / theirs:.2f} x"
            )
            later_turns = {}
            for server, stored, label in (
                (servers[0], True, "clemproxy, previous_response_id"),
                (servers[0], False, "clemproxy, resent as items"),
                (servers[2], False, "transformers serve, resent as items"),
            ):
                first, later = asyncio.run(responses_dialogues(server, 2, args.turns, stored))
                later_turns[label] = statistics.median(later)
                print(
                    f"Responses API, 2 dialogues, {label}: first turn {statistics.median(first):.2f} s, later turns "
                    f"{statistics.median(later):.2f} s = {statistics.median(later) / statistics.median(first):.2f}"
                    " x the first"
                )
            ratio = later_turns["clemproxy, previous_response_id"] / later_turns["transformers serve, resent as items"]
            print(f"Responses API, later turns: clemproxy (previous_response_id) {ratio:.2f} x transformers serve")
        stats = httpx.get(f"{servers[0].url}/admin/api/models/smol-hf", timeout=30).json()["loaded"]
        shown = {key: stats.get(key) for key in ("mean_batch", "prefix_cache_hit_rate")}
        print("clemproxy float32 engine:", json.dumps(shown))
    finally:
        for server in servers:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
