"""Server settings: one frozen object in seven groups, declared once.

Each field carries its default and its help; ``proxy.cli`` derives a flag (``--max-queue``) and an environment
variable (``CLEMPROXY_MAX_QUEUE``) from every field, so a default lives here and nowhere else. Nothing is read
at import time.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from backends import LoadOptions

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
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


class KeyFileError(Exception):
    """A key file that cannot be used; the message names the file, never a key."""


def read_key_file(path: Path) -> list[str]:
    """One key per line; blank lines and ``#`` comments are skipped. An unreadable or empty file is an error:
    a server meant to be guarded must not start open."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {type(exc).__name__}") from None
    found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not found:
        raise KeyFileError(f"key file {path} has no key in it")
    return found


def setting(
    default: Any,
    help: str,
    *,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    memory: bool = False,
    secret: bool = False,
) -> Any:
    """A settings field with what the CLI needs to offer it: help, and how to read a value.

    ``memory``: the value is a size like ``8G`` or ``50%`` (``parse_memory``). ``secret``: never in a repr.
    A tuple-typed field is a repeatable flag whose environment variable lists values, comma-separated.
    """
    metadata = {"help": help, "metavar": metavar, "choices": choices, "memory": memory}
    return field(default=default, repr=not secret, metadata=metadata)


@dataclass(frozen=True)
class ServerSettings:
    """Where the server listens and what it serves."""

    registry: tuple[Path, ...] = setting(
        (),
        "registry file, repeatable, searched in order; default ./model_registry.json, then the bundled one",
        metavar="PATH",
    )
    host: str = setting("127.0.0.1", "bind address")
    port: int = setting(8000, "port")
    log_level: str = setting("info", "log level", choices=LOG_LEVELS)
    shutdown_timeout: float = setting(
        30.0, "on SIGTERM/SIGINT, how long running requests may finish before they are ended", metavar="SECONDS"
    )


@dataclass(frozen=True)
class ManagerSettings:
    """Which models sit in memory, and how requests queue for them."""

    autoload: bool = setting(True, "load a model on its first request; otherwise an unloaded model answers 503")
    worker_processes: bool = setting(
        True,
        "run each loaded local model in a worker process of its own, so that a crash in one ends that model, "
        "not the server; --no-worker-processes: in the server's process",
    )
    threads_follow_load: bool = setting(
        True,
        "with worker processes: the models' CPU threads (--threads) leave out the cores other programs keep busy, "
        "looked at every second",
    )
    preload: tuple[str, ...] = setting((), "load this model at startup, repeatable", metavar="NAME")
    max_queue: int = setting(16, "requests that may wait per model beyond the running ones; more get 503")
    idle_unload: float = setting(
        0.0, "unload a model that has served nothing for this long; 0: never", metavar="SECONDS"
    )
    max_loaded: int = setting(
        0, "models loaded at once; a load beyond it unloads the least recently used idle one; 0: no bound"
    )
    max_memory: int = setting(
        0,
        "memory for loaded models (weights and KV caches), like 8G, 512MiB or 50% of RAM; 0: no bound",
        metavar="SIZE",
        memory=True,
    )
    unload_timeout: float = setting(
        30.0, "how long an unload waits for running requests before ending them", metavar="SECONDS"
    )
    request_timeout: float = setting(
        600.0,
        "how long a request may wait for its model and generate before it is ended with a 504; 0: no limit",
        metavar="SECONDS",
    )
    retry_after: int = setting(2, "seconds a 503 asks the client to wait before it retries (Retry-After)")
    stats_interval: float = setting(
        5.0, "seconds between two points of each loaded model's charts on the admin page", metavar="SECONDS"
    )


@dataclass(frozen=True)
class AccessSettings:
    """Who may use and manage the server. Keys never show in a repr, a log line or a page."""

    api_key: tuple[str, ...] = setting(
        (), "a key that opens /v1 (Authorization: Bearer KEY), repeatable", metavar="KEY", secret=True
    )
    api_key_file: tuple[Path, ...] = setting((), "a file of API keys, repeatable", metavar="PATH")
    admin_key: tuple[str, ...] = setting(
        (), "a key for the admin page, /admin/api and /metrics; also opens /v1; repeatable", metavar="KEY", secret=True
    )
    admin_key_file: tuple[Path, ...] = setting((), "a file of admin keys, repeatable", metavar="PATH")
    insecure_no_auth: bool = setting(False, "listen on a non-loopback address without any key")
    allowed_host: tuple[str, ...] = setting(
        (),
        "a Host name this server answers to besides localhost, 127.0.0.1, ::1 and the bind address; "
        "*.example.org for subdomains, * for any; repeatable",
        metavar="NAME",
    )
    cors_origin: tuple[str, ...] = setting(
        (),
        "a browser origin allowed to call /v1, like https://app.example.org; * for any; repeatable",
        metavar="ORIGIN",
    )

    def with_key_files_read(self) -> AccessSettings:
        """The keys of the key files added to the given ones (empty keys dropped), the files no longer needed.
        Raises ``KeyFileError`` for a file that is missing or holds no key: a guarded server must not start open."""

        def keys(given: tuple[str, ...], files: tuple[Path, ...]) -> tuple[str, ...]:
            found = [*given, *(key for path in files for key in read_key_file(Path(path)))]
            return tuple(dict.fromkeys(key.strip() for key in found if key.strip()))

        return dataclasses.replace(
            self,
            api_key=keys(self.api_key, self.api_key_file),
            admin_key=keys(self.admin_key, self.admin_key_file),
            api_key_file=(),
            admin_key_file=(),
        )


@dataclass(frozen=True)
class LimitSettings:
    """Bounds on one request, each answered with a clear 4xx."""

    max_body_size: int = setting(
        8 * 1024 * 1024, "largest request body accepted (like 8MiB); larger get 413", metavar="SIZE", memory=True
    )
    max_messages: int = setting(2048, "most messages in one chat request; more get 400; 0: no bound")
    max_tokens_limit: int = setting(
        0,
        "largest max_tokens a request may ask for (larger get 400), and the default for requests without one; "
        "0: the context window is the bound",
    )


@dataclass(frozen=True)
class ClusterSettings:
    """Models served beyond this process: upstream servers (``openai_compatible`` entries) and Ray Serve."""

    upstream_connect_timeout: float = setting(
        10.0, "how long to wait for an upstream server to accept a connection before a 502", metavar="SECONDS"
    )
    upstream_read_timeout: float = setting(
        300.0,
        "how long an upstream server may stay silent (before its answer, or mid-stream) before a 504",
        metavar="SECONDS",
    )
    ray: str = setting(
        "",
        "serve each loaded model as a Ray Serve deployment: 'local' starts a private Ray instance on this machine, "
        "an address (HOST:6379, auto) joins a running cluster; needs clemproxy[ray]",
        metavar="local|ADDRESS",
    )
    ray_deploy_timeout: float = setting(
        600.0, "how long a load waits for its replicas to run on the Ray cluster before it fails", metavar="SECONDS"
    )
    upstream_check_interval: float = setting(
        10.0, "how long the admin page trusts its last check of an upstream server (GET /models)", metavar="SECONDS"
    )


@dataclass(frozen=True)
class StorageSettings:
    """What the server keeps on disk: the responses the Responses API stores (``store: true``)."""

    data_dir: str = setting(
        "",
        "folder of the server's database of stored responses; ':memory:' keeps them in memory only, until the "
        "server stops; default: the user's data directory (~/.local/share/clemproxy on Linux)",
        metavar="PATH",
    )
    responses_max_age: float = setting(
        30 * 24 * 3600.0,
        "how long a stored response is kept (OpenAI keeps them 30 days); 0: no bound",
        metavar="SECONDS",
    )
    responses_max_count: int = setting(10000, "most stored responses kept, the oldest going first; 0: no bound")

    def database_dir(self) -> str:
        """``data_dir``, or the user's data directory when it is not set (read now, not at import)."""
        if self.data_dir:
            return self.data_dir
        import platformdirs

        return platformdirs.user_data_dir("clemproxy", appauthor=False)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    models: LoadOptions = field(default_factory=LoadOptions)  # the backends' own options, declared there
    manager: ManagerSettings = field(default_factory=ManagerSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)

    GROUPS: ClassVar[dict[str, type]] = {
        "server": ServerSettings,
        "models": LoadOptions,
        "manager": ManagerSettings,
        "access": AccessSettings,
        "limits": LimitSettings,
        "cluster": ClusterSettings,
        "storage": StorageSettings,
    }

    @classmethod
    def of(cls, **values: Any) -> Settings:
        """Settings from flat field names (``max_queue=2``), as the CLI parses them; each name is in one group."""
        grouped: dict[str, dict[str, Any]] = {name: {} for name in cls.GROUPS}
        for key, value in values.items():
            group = next(
                (g for g, kind in cls.GROUPS.items() if key in {f.name for f in dataclasses.fields(kind)}), None
            )
            if group is None:
                raise TypeError(f"no setting named {key!r}")
            grouped[group][key] = value
        return cls(**{name: kind(**grouped[name]) for name, kind in cls.GROUPS.items()})
