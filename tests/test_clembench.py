"""clembench against clemproxy: clemcore (its PyPI package, in a virtual environment of its own that
``make test`` creates) drives its ``openai_compatible`` backend at a real clemproxy, from a working directory
holding the same key.json and model_registry.json a clembench user writes, on each of our backends."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SMOL, SMOL_HF_GGUF, RunningServer

ROOT = Path(__file__).resolve().parents[1]
CLEMCORE_PYTHON = Path(os.environ.get("CLEMPROXY_CLEMCORE_PYTHON") or ROOT / ".venv-clemcore" / "bin" / "python")


@pytest.mark.parametrize("served", [SMOL, SMOL_HF_GGUF], ids=["llamacpp", "huggingface_local"])
def test_clemcore_openai_compatible_backend(api_server: RunningServer, tmp_path: Path, served: str) -> None:
    assert CLEMCORE_PYTHON.is_file(), f"{CLEMCORE_PYTHON} is missing: `make test` creates it (pip install clemcore)"
    key = {"openai_compatible": {"api_key": "unused", "base_url": f"{api_server.base_url}/v1"}}
    (tmp_path / "key.json").write_text(json.dumps(key))
    entry = {"model_name": "smollm2-local", "backend": "openai_compatible", "model_id": served}
    (tmp_path / "model_registry.json").write_text(json.dumps([entry]))
    result = subprocess.run(
        [str(CLEMCORE_PYTHON), str(ROOT / "tests" / "clembench_driver.py"), "smollm2-local"],
        cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path)},  # no ~/.clemcore/key.json of the user's
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["text"] == "1. Red\n2. Blue\n3. Green"
    assert answer["response"]["model"] == served
    assert answer["response"]["usage"]["completion_tokens"] == 11
