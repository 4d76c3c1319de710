"""clembench against clemproxy: clemcore (its PyPI package, in a virtual environment of its own that
``make test`` creates) drives its ``openai_compatible`` backend at a real clemproxy, from a working directory
holding the same key.json and model_registry.json a clembench user writes, on each of our backends."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from backends import ModelRegistry
from proxy.settings import Settings
from tests.support import SMOL, SMOL_HF_GGUF, RunningServer, smol_entry

ROOT = Path(__file__).resolve().parents[1]
CLEMCORE_PYTHON = Path(os.environ.get("CLEMPROXY_CLEMCORE_PYTHON") or ROOT / ".venv-clemcore" / "bin" / "python")


def run_clemcore(base_url: str, folder: Path, served: str, api_key: str = "unused") -> subprocess.CompletedProcess[str]:
    assert CLEMCORE_PYTHON.is_file(), f"{CLEMCORE_PYTHON} is missing: `make test` creates it (pip install clemcore)"
    key = {"openai_compatible": {"api_key": api_key, "base_url": f"{base_url}/v1"}}
    (folder / "key.json").write_text(json.dumps(key))
    entry = {"model_name": "smollm2-local", "backend": "openai_compatible", "model_id": served}
    (folder / "model_registry.json").write_text(json.dumps([entry]))
    return subprocess.run(
        [str(CLEMCORE_PYTHON), str(ROOT / "tests" / "clembench_driver.py"), "smollm2-local"],
        cwd=folder,
        env={**os.environ, "HOME": str(folder)},  # no ~/.clemcore/key.json of the user's
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_colors(result: subprocess.CompletedProcess[str], served: str) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["text"] == "1. Red\n2. Blue\n3. Green"
    assert answer["response"]["model"] == served
    assert answer["response"]["usage"]["completion_tokens"] == 11


@pytest.mark.parametrize("served", [SMOL, SMOL_HF_GGUF], ids=["llamacpp", "huggingface_local"])
def test_clemcore_openai_compatible_backend(api_server: RunningServer, tmp_path: Path, served: str) -> None:
    assert_colors(run_clemcore(api_server.base_url, tmp_path, served), served)


def test_clemcore_sends_its_key_to_a_guarded_server(tmp_path: Path) -> None:
    """key.json's openai_compatible api_key is the bearer token clemproxy checks; a wrong one is refused."""
    registry = ModelRegistry.from_list([smol_entry()])
    with RunningServer(registry, Settings.of(api_key=("clembench-team-key",))) as server:
        assert_colors(run_clemcore(server.base_url, tmp_path, SMOL, api_key="clembench-team-key"), SMOL)
        refused = run_clemcore(server.base_url, tmp_path, SMOL, api_key="wrong-key")
        assert refused.returncode != 0 and "401" in refused.stderr
