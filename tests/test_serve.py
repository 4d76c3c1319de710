"""`clemproxy serve` as a user starts it: a real process on the bundled registry."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest

from proxy.cli import SERVE, parse_serve
from proxy.settings import Settings
from tests.support import SMOL, ServerProcess


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """The console script, started in an empty folder so that only the bundled registry is read."""
    executable = shutil.which("clemproxy", path=str(Path(sys.executable).parent)) or "clemproxy"
    with ServerProcess(None, cwd=tmp_path, command=[executable], env={"CLEMPROXY_LOG_LEVEL": "warning"}) as server:
        yield server.base_url


def test_serve_answers_the_readme_request(served: str) -> None:
    # The README's curl command, byte for byte the same body.
    body = '{"model":"SmolLM2-135M-Instruct-GGUF","messages":[{"role":"user","content":"Name three colors."}]}'
    # No max_tokens and OpenAI's default temperature of 1: now and then the model samples on to the end of its
    # context (4096 tokens), which takes minutes on a busy 2-core machine. The bound is for a server that hangs.
    response = httpx.post(f"{served}/v1/chat/completions", content=body, timeout=900)
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    assert content.strip() and "<|im_end|>" not in content and "<|im_start|>" not in content
    assert SMOL in [m["id"] for m in httpx.get(f"{served}/v1/models").json()["data"]]


def test_flags_have_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEMPROXY_HOST", "0.0.0.0")
    monkeypatch.setenv("CLEMPROXY_PORT", "9001")
    monkeypatch.setenv("CLEMPROXY_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("CLEMPROXY_CONTEXT_SIZE", "2048")
    settings = parse_serve([])
    server = settings.server
    assert (server.host, server.port, server.log_level, settings.models.context_size) == (
        "0.0.0.0",
        9001,
        "debug",
        2048,
    )
    settings = parse_serve(["--port", "9002", "--registry", "a.json", "--registry", "b.json"])
    assert settings.server.port == 9002 and [str(p) for p in settings.server.registry] == ["a.json", "b.json"]
    assert parse_serve([]).server.host == "0.0.0.0"
    monkeypatch.delenv("CLEMPROXY_HOST")
    assert parse_serve([]).server.host == "127.0.0.1"  # loopback unless told otherwise
    monkeypatch.setenv("CLEMPROXY_REGISTRY", os.pathsep.join(["one.json", "two.json"]))  # listed like PATH
    assert [str(p) for p in parse_serve([]).server.registry] == ["one.json", "two.json"]


def test_manager_flags_and_their_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = parse_serve([]).manager
    assert (manager.autoload, manager.preload, manager.max_queue, manager.idle_unload) == (True, (), 16, 0.0)
    assert (manager.max_loaded, manager.max_memory, manager.unload_timeout) == (0, 0, 30.0)
    monkeypatch.setenv("CLEMPROXY_AUTOLOAD", "0")
    monkeypatch.setenv("CLEMPROXY_MAX_LOADED", "2")
    monkeypatch.setenv("CLEMPROXY_MAX_MEMORY", "4GiB")
    manager = parse_serve(["--preload", "a", "--preload", "b", "--idle-unload", "300"]).manager
    assert (manager.autoload, manager.preload, manager.idle_unload) == (False, ("a", "b"), 300.0)
    assert (manager.max_loaded, manager.max_memory) == (2, 4 * 1024**3)
    assert parse_serve(["--autoload"]).manager.autoload  # the flag wins over the environment
    monkeypatch.setenv("CLEMPROXY_PRELOAD", "a, b")
    assert parse_serve([]).manager.preload == ("a", "b")
    with pytest.raises(click.BadParameter, match="not a memory size"):
        parse_serve(["--max-memory", "lots"])


def test_every_setting_is_a_flag_with_its_variable_and_one_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI is derived from the settings: no flag has a default of its own (once, request_timeout had two)."""
    for name in [n for n in os.environ if n.startswith("CLEMPROXY_")]:
        monkeypatch.delenv(name)
    assert parse_serve([]) == Settings()
    usage = SERVE.get_help(click.Context(SERVE, auto_envvar_prefix="CLEMPROXY"))
    for group in Settings.GROUPS.values():
        for setting in dataclasses.fields(group):
            assert f"--{setting.name.replace('_', '-')}" in usage and f"CLEMPROXY_{setting.name.upper()}" in usage


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
