"""Real servers for the tests: in a thread (``RunningServer``) or as a process (``ServerProcess``), and clients
that use them as people do: a browser session on the admin page, a stream read on its own thread."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import httpx
import uvicorn

from backends import ModelRegistry
from proxy.app import Services, create_app
from proxy.settings import Settings
from tests.support.models import COLORS, COUNTING, SMOL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, registry: ModelRegistry, settings: Settings | None = None) -> None:
        self.port = free_port()
        self.app = create_app(settings or Settings(), registry=registry)
        self.services: Services = self.app.state.services
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServerProcess:
    """``clemproxy serve`` as a user runs it: a real process, its log in a file (a pipe nobody reads would fill
    up and block the server). With ``registry`` None it serves what a user's working directory gives it (the
    bundled registry, in an empty folder); ``command`` replaces ``python -m proxy.cli`` (the console script)."""

    def __init__(
        self,
        registry: Path | None,
        *flags: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        host: str = "127.0.0.1",
        command: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        folder = cwd or (registry.parent if registry is not None else Path.cwd())
        self.log_path = folder / f"server-{self.port}.log"
        command = [*(command or [sys.executable, "-m", "proxy.cli"]), "serve", "--host", host, "--port", str(self.port)]
        if registry is not None:
            command += ["--registry", str(registry)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*command, *flags],
                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                cwd=folder,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_serving(self, timeout: float = 60) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, f"the server exited with {self.process.returncode}: {self.log()}"
            assert time.monotonic() < deadline, f"the server did not start: {self.log()}"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def __enter__(self) -> ServerProcess:
        return self.wait_serving()

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


CSRF_IN_PAGE = re.compile(r'name="csrf_token" value="([^"]+)"')


class AdminSession:
    """What a browser holds on the admin page: its cookies, and the CSRF token the page puts in every form.
    With a key it signs in through the login form first."""

    def __init__(self, base_url: str, key: str | None = None) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=120, follow_redirects=True)
        if key is not None:
            login = self.client.get("/admin/login")
            token = csrf_token_in(login.text)
            signed_in = self.client.post("/admin/login", data={"key": key, "csrf_token": token, "next": "/admin/"})
            assert signed_in.status_code == 200 and signed_in.url.path == "/admin/", signed_in.text
        self.page = self.client.get("/admin/")
        assert self.page.status_code == 200, self.page.text
        self.token = csrf_token_in(self.page.text)

    def post(self, path: str, data: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        """A form POST as the page's forms send it: with the CSRF token in a hidden field."""
        return self.client.post(path, data={**(data or {}), "csrf_token": self.token}, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)


def csrf_token_in(html: str) -> str:
    match = CSRF_IN_PAGE.search(html)
    assert match, "no CSRF token in the page"
    return match[1]


# ChatML written with the bos_token/eos_token variables, which SmolLM2's GGUF fills with <|im_start|>/<|im_end|>;
# ``answer_prefix`` is a template variable a request can set through chat_template_kwargs.
def wait_until(condition: Callable[[], bool], what: str, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


class StreamInThread:
    """A streaming chat request run on its own thread, recording every SSE line and when it finished."""

    finished: ClassVar[list[str]] = []  # labels in completion order, shared by the streams of one test

    def __init__(
        self,
        base_url: str,
        label: str = "stream",
        model: str = SMOL,
        max_tokens: int = 40,
        messages: list[dict[str, str]] | None = None,
        **extra: Any,
    ) -> None:
        """``extra``: more fields of the request's body (``response_format``, ...)."""
        self.label = label
        self.status = 0
        self.lines: list[str] = []
        self.body = {
            "model": model,
            "messages": messages or COUNTING,
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": True,
            **extra,
        }
        self.url = f"{base_url}/v1/chat/completions"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, timeout=120) as response:
            self.status = response.status_code
            for line in response.iter_lines():  # as they come: a test may look at a stream mid-way
                if line:
                    self.lines.append(line)
        StreamInThread.finished.append(self.label)

    def join(self) -> StreamInThread:
        self.thread.join(timeout=120)
        assert not self.thread.is_alive()
        return self

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line[6:]) for line in self.lines if line.startswith("data: {")]

    @property
    def text(self) -> str:
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in self.events if e.get("choices"))

    @property
    def finish_reasons(self) -> list[str]:
        return [
            e["choices"][0]["finish_reason"]
            for e in self.events
            if e.get("choices") and e["choices"][0]["finish_reason"]
        ]


def complete(client: Any, model: str = SMOL, **kwargs: Any) -> Any:
    """A greedy chat completion through the openai SDK, of COLORS unless told otherwise."""
    kwargs.setdefault("messages", COLORS)
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 40)
    return client.chat.completions.create(model=model, **kwargs)


def stream_chunks(client: Any, model: str = SMOL, **kwargs: Any) -> list[Any]:
    return list(complete(client, model, stream=True, **kwargs))


def streamed_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def post_chat(server: RunningServer, content: bytes | str) -> httpx.Response:
    """A raw chat request body, as a client that is not the SDK might send it."""
    return httpx.post(
        f"{server.base_url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
    )
