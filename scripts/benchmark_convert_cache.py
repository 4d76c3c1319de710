"""On-demand benchmark of loading a transformers model from a GGUF file, with and without the conversion cache:
ratios, in one run on one machine (not a test).

    .venv/bin/python scripts/benchmark_convert_cache.py [--repeats 3]

Every load is clemproxy's own ``huggingface_local`` load of the bundled ``SmolLM2-135M-Instruct`` entry (the
demo GGUF through ``gguf_file``, float32 on the CPU), in a fresh process of its own, timed around
``Model.load()``; each round loads, one after the other:

- the GGUF converted afresh (``--convert-cache none``): what every load cost before the cache;
- the first load on an empty cache: it converts, saves, then reads what it saved;
- a later load, from the cache;
- the same weights from a plain safetensors checkpoint folder (a copy of the cached one, as a ``model_path``
  entry): what a user who has safetensors gets, and the goal's yardstick (a cached load at most 1.5 times it).

Medians over the rounds are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backends.weights.convert_cache import MARKER  # noqa: E402
from tests.support import SMOL_HF_GGUF, bundled_entry, smol_hf_entry  # noqa: E402

LOAD = """
import json, sys, time
from backends import LoadOptions, ModelRegistry, create_model
entry, cache = json.loads(sys.argv[1]), sys.argv[2]
model = create_model(ModelRegistry.from_list([entry]).resolve(entry["model_name"]), LoadOptions(convert_cache=cache))
started = time.perf_counter()
model.load()
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "source": model.load_info()["source"]}))
"""


def timed_load(entry: dict[str, object], cache: str) -> tuple[float, str]:
    answer = subprocess.run(
        [sys.executable, "-c", LOAD, json.dumps(entry), cache],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    result = json.loads(answer.stdout.strip().splitlines()[-1])
    return float(result["seconds"]), str(result["source"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    args = parser.parse_args()
    gguf_entry = bundled_entry(SMOL_HF_GGUF)
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    times: dict[str, list[float]] = {"afresh": [], "first": [], "cached": [], "safetensors": []}
    try:
        for round_ in range(args.repeats):
            cache = work / f"cache-{round_}"
            times["afresh"].append(timed_load(gguf_entry, "none")[0])
            seconds, source = timed_load(gguf_entry, str(cache))
            times["first"].append(seconds)
            times["cached"].append(timed_load(gguf_entry, str(cache))[0])
            folder = work / f"safetensors-{round_}"
            shutil.copytree(source, folder, ignore=shutil.ignore_patterns(MARKER))
            times["safetensors"].append(timed_load(smol_hf_entry("smol-safetensors", folder), "none")[0])
            shutil.rmtree(cache)
        median = {kind: statistics.median(values) for kind, values in times.items()}
        print(f"machine: {os.cpu_count()} cores; {SMOL_HF_GGUF} from the demo GGUF, float32; medians of {args.repeats}")
        for kind, label in (
            ("afresh", "GGUF converted on every load (--convert-cache none)"),
            ("first", "first load, empty cache (converts and saves)"),
            ("cached", "later load, from the cache"),
            ("safetensors", "the same weights as a safetensors folder"),
        ):
            print(f"{label:55s} {median[kind]:6.2f} s")
        print(
            f"cached / safetensors {median['cached'] / median['safetensors']:.2f} x (goal <= 1.5); "
            f"afresh / cached {median['afresh'] / median['cached']:.1f} x; "
            f"first / afresh {median['first'] / median['afresh']:.2f} x"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
