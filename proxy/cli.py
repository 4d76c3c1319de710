"""``clemproxy serve`` and ``clemproxy check``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from backends.credentials import huggingface_token
from backends.errors import CredentialsError
from backends.registry import ModelRegistry, RegistryFileError, registry_sources
from proxy.security import KeyFileError, RedactingFormatter, is_loopback, read_key_file
from proxy.settings import Settings, parse_memory

logger = logging.getLogger("clemproxy")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CLEMPROXY_{name}", default)


def env_name(flag: str) -> str:
    """``--max-queue`` (or the argparse dest ``max_queue``) -> ``MAX_QUEUE``, read as ``CLEMPROXY_MAX_QUEUE``."""
    return flag.removeprefix("--").replace("-", "_").upper()


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in _env(name, "").split(",") if item.strip()]


def _env_registries() -> list[Path]:
    value = os.environ.get("CLEMPROXY_REGISTRY", "")
    return [Path(p) for p in value.split(os.pathsep) if p]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clemproxy", description="OpenAI-compatible server for clembench model registries"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add_registry(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--registry",
            action="append",
            type=Path,
            default=None,
            metavar="PATH",
            help="registry file, repeatable, searched in order (env CLEMPROXY_REGISTRY, "
            f"separated by '{os.pathsep}'); default ./model_registry.json, then the bundled one",
        )

    serve = commands.add_parser("serve", help="start the server")
    add_registry(serve)

    def option(flag: str, convert: Callable[[str], Any], default: str, help: str, **kwargs: Any) -> None:
        """A flag whose default comes from CLEMPROXY_<FLAG>, which its help names."""
        env = env_name(flag)
        serve.add_argument(
            flag, type=convert, default=convert(_env(env, default)), help=f"{help} (env CLEMPROXY_{env})", **kwargs
        )

    option("--host", str, "127.0.0.1", "bind address")
    option("--port", int, "8000", "port")
    option("--log-level", str.lower, "info", "log level", choices=LOG_LEVELS)
    option("--context-size", int, "4096", "context window for entries without context_size")
    serve.add_argument(
        "--no-autoload",
        dest="autoload",
        action="store_false",
        default=_env("AUTOLOAD", "1").lower() not in ("0", "false", "no"),
        help="do not load models on their first request; an unloaded model answers 503 (env CLEMPROXY_AUTOLOAD=0)",
    )
    serve.add_argument(
        "--preload",
        action="append",
        default=None,
        metavar="NAME",
        help="load this model at startup, repeatable (env CLEMPROXY_PRELOAD, comma-separated)",
    )
    option("--max-queue", int, "16", "requests that may wait per model beyond the running ones; more get 503")
    option(
        "--idle-unload",
        float,
        "0",
        "unload a model that has served nothing for this long; 0: never",
        metavar="SECONDS",
    )
    option(
        "--max-loaded",
        int,
        "0",
        "models loaded at once; a load beyond it unloads the least recently used idle one; 0: no bound",
    )
    option(
        "--max-memory",
        parse_memory,
        "0",
        "memory for loaded model weights, like 8G, 512MiB or 50%% of RAM; 0: no bound",
        metavar="SIZE",
    )
    option(
        "--shutdown-timeout",
        float,
        "30",
        "on SIGTERM/SIGINT, how long running requests may finish before they are ended",
        metavar="SECONDS",
    )
    option("--max-body-size", parse_memory, "8MiB", "largest request body accepted; larger get 413", metavar="SIZE")
    option(
        "--unload-timeout",
        float,
        "30",
        "how long an unload waits for running requests before cancelling them",
        metavar="SECONDS",
    )

    option("--max-messages", int, "2048", "most messages in one chat request; more get 400")
    option(
        "--max-tokens-limit",
        int,
        "0",
        "largest max_tokens a request may ask for (larger get 400), and the default for requests without one; "
        "0: the context window is the bound",
    )
    option(
        "--request-timeout",
        float,
        "600",
        "how long a request may wait for its model and generate before it is ended with a 504; 0: no limit",
        metavar="SECONDS",
    )

    access = serve.add_argument_group(
        "access",
        "Keys are best given in a file or the environment: a command line is visible to every user of the "
        "machine. A key file has one key per line; blank lines and lines starting with # are skipped.",
    )

    def repeatable(flag: str, help: str, metavar: str, convert: Callable[[str], Any] = str) -> None:
        env = env_name(flag)
        access.add_argument(
            flag,
            action="append",
            type=convert,
            default=None,
            metavar=metavar,
            help=f"{help}, repeatable (env CLEMPROXY_{env}, comma-separated)",
        )

    repeatable("--api-key", "a key that opens /v1 (Authorization: Bearer KEY)", "KEY")
    repeatable("--api-key-file", "a file of API keys", "PATH", Path)
    repeatable("--admin-key", "a key for the admin page, /admin/api and /metrics; also opens /v1", "KEY")
    repeatable("--admin-key-file", "a file of admin keys", "PATH", Path)
    access.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=_env("INSECURE_NO_AUTH", "0").lower() in ("1", "true", "yes"),
        help="listen on a non-loopback address without any key (env CLEMPROXY_INSECURE_NO_AUTH=1)",
    )
    repeatable(
        "--allowed-host",
        "a Host name this server answers to besides localhost, 127.0.0.1, ::1 and the bind address; "
        "*.example.org for subdomains, * for any",
        "NAME",
    )
    repeatable(
        "--cors-origin", "a browser origin allowed to call /v1, like https://app.example.org; * for any", "ORIGIN"
    )

    check = commands.add_parser("check", help="validate the registries and list every problem")
    add_registry(check)
    return parser


def listed(args: argparse.Namespace, name: str) -> list[Any]:
    """A repeatable flag's values, or its environment variable's comma-separated ones."""
    given = getattr(args, name)
    return list(given) if given is not None else _env_list(env_name(name))


def keys(args: argparse.Namespace, kind: str) -> tuple[str, ...]:
    """The keys of one kind, from the flag, the environment and key files."""
    found = listed(args, f"{kind}_key")
    for path in listed(args, f"{kind}_key_file"):
        found.extend(read_key_file(Path(path)))
    return tuple(dict.fromkeys(key.strip() for key in found if key.strip()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    registries = tuple(args.registry if args.registry is not None else _env_registries())
    if args.command == "check":
        return check(registries)
    try:
        api_keys, admin_keys = keys(args, "api"), keys(args, "admin")
    except KeyFileError as exc:
        print(f"clemproxy: {exc}", file=sys.stderr)
        return 2
    return serve(
        Settings(
            registries=registries,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            context_size=args.context_size,
            autoload=args.autoload,
            preload=tuple(listed(args, "preload")),
            max_queue=args.max_queue,
            idle_unload=args.idle_unload,
            max_loaded=args.max_loaded,
            max_memory=args.max_memory,
            unload_timeout=args.unload_timeout,
            max_body_size=args.max_body_size,
            shutdown_timeout=args.shutdown_timeout,
            api_keys=api_keys,
            admin_keys=admin_keys,
            insecure_no_auth=args.insecure_no_auth,
            allowed_hosts=tuple(listed(args, "allowed_host")),
            cors_origins=tuple(listed(args, "cors_origin")),
            max_messages=args.max_messages,
            max_tokens_limit=args.max_tokens_limit,
            request_timeout=args.request_timeout,
        )
    )


def check(registries: Sequence[Path]) -> int:
    """Print every problem, entry by entry; 0 when there are no errors."""
    sources = registry_sources(registries)
    errors = 0
    for source in sources:
        try:
            registry = ModelRegistry.from_files([source])
        except RegistryFileError as exc:
            print(f"{exc}", file=sys.stdout)
            errors += 1
            continue
        problems = [entry for entry in registry if entry.problems]
        print(f"{source}: {len(registry)} entries, {sum(1 for e in registry if e.errors)} invalid")
        for entry in problems:
            print(f"  #{entry.index} {entry.name} ({entry.backend or 'no backend'}):")
            for problem in entry.problems:
                print(f"    {problem}")
            errors += len(entry.errors)
    print("OK" if not errors else f"{errors} error(s)")
    return 0 if not errors else 1


def serve(settings: Settings) -> int:
    from proxy.app import create_app

    configure_logging(settings)
    if not exposure_allowed(settings):
        return 2
    try:
        app = create_app(settings)
    except RegistryFileError as exc:
        logger.error("%s", exc)
        return 2
    logger.info(
        "clemproxy on http://%s:%d/v1 (registries: %s)",
        settings.host,
        settings.port,
        ", ".join(str(p) for p in registry_sources(settings.registries)),
    )
    for line in app.state.access.describe():
        logger.info("%s", line)
    # uvicorn logs through our handler (log_config=None), so that its lines are redacted too. Our access log
    # (proxy.access_log) replaces uvicorn's: it carries the request id and the duration.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
    )
    DrainingServer(config, app, settings.shutdown_timeout).run()
    return 0


def configure_logging(settings: Settings) -> None:
    """One handler on the root logger, whose formatter blanks out every key and token this server holds."""
    hidden = [*settings.api_keys, *settings.admin_keys, os.environ.get("HF_TOKEN", "")]
    with contextlib.suppress(CredentialsError):
        hidden.append(huggingface_token())
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", redact=hidden))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


def exposure_allowed(settings: Settings) -> bool:
    """Without any key, listen on loopback only, unless told --insecure-no-auth; say which it is."""
    if settings.api_keys or settings.admin_keys:
        return True
    if is_loopback(settings.host):
        logger.warning(
            "no API or admin key: listening on loopback (%s) only; anyone on this machine can use and manage "
            "the models (--api-key-file and --admin-key-file guard them)",
            settings.host,
        )
        return True
    if not settings.insecure_no_auth:
        logger.error(
            "refusing to listen on %s without a key: anyone who can reach it could use and unload the models. "
            "Give --api-key-file (and --admin-key-file), or --insecure-no-auth where the network is yours alone",
            settings.host,
        )
        return False
    logger.warning(
        "--insecure-no-auth: listening on %s with no key; anyone who can reach it can use and manage the models",
        settings.host,
    )
    return True


class DrainingServer(uvicorn.Server):
    """uvicorn, with a graceful stop: on SIGTERM/SIGINT the server keeps listening but answers new requests with
    503, lets running ones finish for ``shutdown_timeout`` seconds, ends the rest with a clear error, unloads
    the models and exits 0. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, app: Any, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.app = app
        self.shutdown_timeout = shutdown_timeout
        self.draining: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler may interrupt anything, even a log write in progress: it only hands over to the loop.
        loop = getattr(self, "loop", None)
        if loop is None:
            self.should_exit = True
            return
        loop.call_soon_threadsafe(self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        manager = getattr(self.app.state, "manager", None)  # there once the app has started
        if self.draining is not None or manager is None:
            self.should_exit = True  # no re-raised signal afterwards: a graceful stop exits 0
            self.force_exit = self.draining is not None
            return
        logger.info(
            "%s: no new requests; running ones have %.0f s to finish", signal.Signals(sig).name, self.shutdown_timeout
        )
        self.draining = asyncio.get_running_loop().create_task(self._drain(manager))

    async def _drain(self, manager: Any) -> None:
        try:
            await manager.drain(self.shutdown_timeout)
        finally:
            self.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
