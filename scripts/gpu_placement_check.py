"""Check GPU placement for real, on a machine with a CUDA GPU: run it there, read what it prints.

    .venv/bin/python scripts/gpu_placement_check.py

Loads the demo SmolLM2 on each backend with each placement the registry keys allow (everything on the
GPU, N layers on the GPU, CPU only) and prints, per load, what ``load_info()`` says was done next to
what torch / llama.cpp report, plus a greedy answer and tokens per second. llama.cpp needs a CUDA build
(``CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python``); without
one its GPU rows say so. Exits 1 if a placement was not what was asked for.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backends import GenerationOutcome, GenerationParams, ModelRegistry, create_model

COLORS = [{"role": "user", "content": "Name three colors."}]
PLACEMENTS: list[dict[str, Any]] = [{"execute_on": "gpu"}, {"gpu_layers_offloaded": 10}, {"execute_on": "cpu"}]


def check(entry: dict[str, Any], placement: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    import torch

    entry = {k: v for k, v in entry.items() if k not in ("execute_on", "gpu_layers_offloaded")} | placement
    model = create_model(ModelRegistry.from_list([entry]).resolve(entry["model_name"]))
    started = time.perf_counter()
    model.load()
    load_s = time.perf_counter() - started
    info = model.load_info()
    params = GenerationParams(max_tokens=64, temperature=0)
    outcome = GenerationOutcome()
    started = time.perf_counter()
    text = "".join(model.generate(model.prepare(COLORS, params), params, threading.Event(), outcome))
    seconds = time.perf_counter() - started
    report: dict[str, Any] = {
        "backend": entry["backend"],
        "placement": placement,
        "load_s": round(load_s, 2),
        "answer": text,
        "tokens_per_s": round(outcome.completion_tokens / seconds, 1),
        **{k: info.get(k) for k in ("device", "dtype", "layers_on_gpu", "layers_total", "model_bytes", "warnings")},
    }
    if entry["backend"] == "huggingface_local":
        devices = sorted({str(p.device) for p in model._model.parameters()})
        report["torch_devices"] = devices
        report["cuda_memory_allocated"] = torch.cuda.memory_allocated()
    wanted_gpu = placement.get("execute_on") != "cpu"
    on_gpu = bool(info.get("layers_on_gpu"))
    gpu_possible = bool(info.get("gpu_available"))
    ok = on_gpu == (wanted_gpu and gpu_possible) and bool(text.strip())
    if placement.get("gpu_layers_offloaded") and gpu_possible:
        ok = ok and info["layers_on_gpu"] == placement["gpu_layers_offloaded"]
    model.unload()
    return report, ok


def main() -> int:
    import torch

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}", flush=True)
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}", flush=True)
    registry = json.loads((Path(__file__).resolve().parents[1] / "model_registry.json").read_text())
    entries = [e for e in registry if e["model_name"] in ("SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct")]
    failures = 0
    for entry in entries:
        for placement in PLACEMENTS:
            try:
                report, ok = check(entry, placement)
            except Exception as exc:  # a report line, not a traceback, per failed load
                report, ok = {"backend": entry["backend"], "placement": placement, "error": repr(exc)}, False
            failures += not ok
            print(("OK  " if ok else "BAD ") + json.dumps(report), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
