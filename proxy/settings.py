"""Server settings: one frozen object, filled from CLI flags and ``CLEMPROXY_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    registries: tuple[Path, ...] = ()  # empty: ./model_registry.json if present, then the bundled registry
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    context_size: int = 4096  # llama.cpp context when the entry sets none; capped at the model's trained length
