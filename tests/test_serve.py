"""`clemproxy serve` as a user starts it: a real process on the bundled registry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.cli import build_parser
from tests.conftest import SMOL, free_port


def wait_until_serving(process: subprocess.Popen[str], url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}: {process.stdout.read() if process.stdout else ''}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError("server did not start")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """The console script, started in an empty folder so that only the bundled registry is read."""
    port = free_port()
    executable = shutil.which("clemproxy", path=str(Path(sys.executable).parent)) or "clemproxy"
    env = dict(os.environ, CLEMPROXY_PORT=str(port), CLEMPROXY_LOG_LEVEL="warning")
    process = subprocess.Popen(
        [executable, "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_answers_the_readme_request(served: str) -> None:
    # The README's curl command, byte for byte the same body.
    body = '{"model":"SmolLM2-135M-Instruct-GGUF","messages":[{"role":"user","content":"Name three colors."}]}'
    response = httpx.post(f"{served}/v1/chat/completions", content=body, timeout=120)
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    assert content.strip() and "<|im_end|>" not in content and "<|im_start|>" not in content
    assert SMOL in [m["id"] for m in httpx.get(f"{served}/v1/models").json()["data"]]


def test_flags_have_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEMPROXY_HOST", "0.0.0.0")
    monkeypatch.setenv("CLEMPROXY_PORT", "9001")
    monkeypatch.setenv("CLEMPROXY_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("CLEMPROXY_CONTEXT_SIZE", "2048")
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.log_level, args.context_size) == ("0.0.0.0", 9001, "debug", 2048)
    args = build_parser().parse_args(["serve", "--port", "9002", "--registry", "a.json", "--registry", "b.json"])
    assert args.port == 9002 and [str(p) for p in args.registry] == ["a.json", "b.json"]
    assert build_parser().parse_args(["serve"]).host == "0.0.0.0"
    monkeypatch.delenv("CLEMPROXY_HOST")
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"  # loopback unless told otherwise


def test_manager_flags_and_their_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.autoload, args.preload, args.max_queue, args.idle_unload) == (True, None, 16, 0.0)
    assert (args.max_loaded, args.max_memory, args.unload_timeout) == (0, 0, 30.0)
    monkeypatch.setenv("CLEMPROXY_AUTOLOAD", "0")
    monkeypatch.setenv("CLEMPROXY_MAX_LOADED", "2")
    monkeypatch.setenv("CLEMPROXY_MAX_MEMORY", "4GiB")
    args = build_parser().parse_args(["serve", "--preload", "a", "--preload", "b", "--idle-unload", "300"])
    assert (args.autoload, args.preload, args.idle_unload) == (False, ["a", "b"], 300.0)
    assert (args.max_loaded, args.max_memory) == (2, 4 * 1024**3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-memory", "lots"])


def test_serve_refuses_a_missing_registry_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--registry", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "cannot read registry file" in result.stderr
