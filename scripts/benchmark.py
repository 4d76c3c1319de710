"""On-demand benchmark: ratios, not absolute times, so that runs on different machines compare.

    .venv/bin/python scripts/benchmark.py [--tokens 64] [--repeats 3]

For the demo SmolLM2 it reports
- each backend's decode speed (tokens/s) and its ratio to llama.cpp's;
- the cost of serving: the same greedy generation straight from the model and through the server with the
  openai SDK, streamed and not (ratio of wall times; 1.00 means the HTTP layer costs nothing).
Greedy "count to 100" runs to ``--tokens`` on every backend, so every run generates the same number of tokens.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backends import GenerationOutcome, GenerationParams, ModelRegistry, create_model
from backends.registry.entries import bundled_registry_path

COUNTING = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]
MODELS = {"llamacpp": "SmolLM2-135M-Instruct-GGUF", "huggingface_local": "SmolLM2-135M-Instruct"}


def direct(model: Any, tokens: int) -> tuple[float, int]:
    params = GenerationParams(max_tokens=tokens, temperature=0)
    prompt = model.prepare(COUNTING, params)
    outcome = GenerationOutcome()
    started = time.perf_counter()
    for _ in model.generate(prompt, params, threading.Event(), outcome):
        pass
    return time.perf_counter() - started, outcome.completion_tokens


def median_time(run: Any, repeats: int) -> float:
    run()  # warm-up
    return statistics.median(run() for _ in range(repeats))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    registry = ModelRegistry.from_files([bundled_registry_path()])

    print(f"decode speed, greedy, {args.tokens} tokens, median of {args.repeats}")
    speeds: dict[str, float] = {}
    for backend, name in MODELS.items():
        model = create_model(registry.resolve(name))
        started = time.perf_counter()
        model.load()
        load_s = time.perf_counter() - started
        seconds = median_time(lambda model=model: direct(model, args.tokens)[0], args.repeats)
        speeds[backend] = args.tokens / seconds
        print(f"  {backend:18s} {speeds[backend]:7.1f} tokens/s   load {load_s:5.1f} s")
        model.unload()
    base = speeds["llamacpp"]
    for backend, speed in speeds.items():
        print(f"  ratio {backend} / llamacpp: {speed / base:.2f}")

    import uvicorn
    from openai import OpenAI

    from proxy.app import create_app
    from proxy.settings import Settings

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Settings(), registry=registry), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    print(f"\nserving overhead, {args.tokens} tokens: wall time through HTTP / straight from the model")
    for backend, name in MODELS.items():
        model = create_model(registry.resolve(name))
        model.load()
        alone = median_time(lambda model=model: direct(model, args.tokens)[0], args.repeats)
        model.unload()

        def through(stream: bool, name: str = name) -> float:
            started = time.perf_counter()
            kwargs: dict[str, Any] = {"model": name, "messages": COUNTING, "temperature": 0, "max_tokens": args.tokens}
            if stream:
                for _ in client.chat.completions.create(stream=True, **kwargs):
                    pass
            else:
                client.chat.completions.create(**kwargs)
            return time.perf_counter() - started

        for stream in (False, True):
            served = median_time(lambda stream=stream: through(stream), args.repeats)
            print(f"  {backend:18s} {'stream' if stream else 'whole '}  {served / alone:.2f}")
    server.should_exit = True
    thread.join(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
