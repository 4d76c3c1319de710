"""Server settings: one frozen object, filled from CLI flags and ``CLEMPROXY_*`` environment variables."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_memory(text: str) -> int:
    """``"8G"``, ``"512MiB"``, ``"1000000"`` bytes, or ``"50%"`` of this machine's RAM; 0 means no bound."""
    value = text.strip().lower().removesuffix("b")
    if value.endswith("%"):
        percent = float(value[:-1])
        if not 0 < percent <= 100:
            raise ValueError(f"a memory percentage must be in (0, 100], got {text!r}")
        return int(total_memory_bytes() * percent / 100)
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?)?", value)
    if not match:
        raise ValueError(f"not a memory size: {text!r} (examples: 8G, 512MiB, 50%)")
    return int(float(match[1]) * _UNITS[match[2] or ""])


@dataclass(frozen=True)
class Settings:
    registries: tuple[Path, ...] = ()  # empty: ./model_registry.json if present, then the bundled registry
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    context_size: int = 4096  # context window for entries without context_size; capped at the model's own
    autoload: bool = True  # load a model on its first request
    preload: tuple[str, ...] = ()  # models loaded at startup
    max_queue: int = 16  # waiting requests per model beyond the running ones
    idle_unload: float = 0.0  # seconds; 0: never
    max_loaded: int = 0  # 0: no bound
    max_memory: int = 0  # bytes of loaded model weights; 0: no bound
    unload_timeout: float = 30.0  # seconds an unload waits for running requests before cancelling them
    max_body_size: int = 8 * 1024 * 1024  # bytes of a request body; more gets 413
    shutdown_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM/SIGINT
    # Access. Keys never show in a repr, a log line or a page.
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # any of them opens /v1; none: /v1 is open
    admin_keys: tuple[str, ...] = field(default=(), repr=False)  # the admin side; none: the API keys guard it
    insecure_no_auth: bool = False  # allow a non-loopback bind without any key
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides loopback ones and the bind address; "*": any
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call /v1; "*": any
    # Limits on one request.
    max_messages: int = 2048  # messages in one chat request
    max_tokens_limit: int = 0  # the largest max_tokens accepted, and the default for requests without; 0: none
    request_timeout: float = 600.0  # seconds in the model's queue and generating; 0: no limit
