"""``clemproxy serve`` and ``clemproxy check``.

Every field of ``proxy.settings.Settings`` is a flag of ``serve`` (``max_queue`` -> ``--max-queue``); click
reads the same setting from ``CLEMPROXY_MAX_QUEUE`` when the flag is not given (its ``auto_envvar_prefix``),
and a repeatable flag's variable lists values comma-separated (``CLEMPROXY_REGISTRY`` by ``os.pathsep``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import typing
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import click
import uvicorn

from backends.errors import CredentialsError
from backends.registry.entries import OTHER_BACKENDS, ModelRegistry, RegistryFileError, registry_sources
from backends.weights.credentials import huggingface_token, key_section
from proxy.manager import ModelManager
from proxy.security import RedactingFormatter, is_loopback
from proxy.settings import KeyFileError, ServerSettings, Settings, parse_memory

logger = logging.getLogger("clemproxy")

ENV_PREFIX = "CLEMPROXY"
CONTEXT = {"auto_envvar_prefix": ENV_PREFIX, "help_option_names": ["-h", "--help"], "max_content_width": 110}


class Listed(click.ParamType[Any]):
    """One value of a repeatable flag; its environment variable holds several, comma-separated."""

    name = "text"
    envvar_list_splitter = ","

    def __init__(self, convert: type = str) -> None:
        self.element = convert

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return self.element(value.strip()) if isinstance(value, str) else value


class MemorySize(click.ParamType[int]):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        try:
            return parse_memory(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def human_size(value: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value and value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def option_for(setting: dataclasses.Field[Any], hint: Any) -> click.Option:
    """The flag of one settings field, typed, with its default and help from the field."""
    meta = setting.metadata
    flag = "--" + setting.name.replace("_", "-")
    common: dict[str, Any] = {"help": meta["help"], "show_envvar": True, "metavar": meta.get("metavar")}
    if hint is bool:
        decls = [f"{flag}/--no-{flag[2:]}"] if setting.default else [flag]
        return click.Option([setting.name, *decls], default=setting.default, is_flag=True, **common)
    if typing.get_origin(hint) is tuple:
        element = typing.get_args(hint)[0]
        # Registry files are listed in CLEMPROXY_REGISTRY like PATH lists folders (click.Path splits on os.pathsep).
        kind: click.ParamType[Any] = click.Path(path_type=Path) if setting.name == "registry" else Listed(element)
        return click.Option([setting.name, flag], type=kind, multiple=True, default=(), **common)
    if meta.get("memory"):
        shown = human_size(int(setting.default))  # type: ignore[arg-type]
        return click.Option(
            [setting.name, flag], type=MemorySize(), default=setting.default, show_default=shown, **common
        )
    choices = meta.get("choices")
    kind = click.Choice(choices, case_sensitive=False) if choices else click.types.convert_type(hint)
    return click.Option([setting.name, flag], type=kind, default=setting.default, show_default=True, **common)


def settings_options() -> list[click.Parameter]:
    options: list[click.Parameter] = []
    for group in Settings.GROUPS.values():
        hints = typing.get_type_hints(group)
        options += [option_for(f, hints[f.name]) for f in dataclasses.fields(group)]
    return options


def registry_option() -> click.Option:
    field = next(f for f in dataclasses.fields(ServerSettings) if f.name == "registry")
    return option_for(field, typing.get_type_hints(ServerSettings)["registry"])


def run_serve(**values: Any) -> int:
    return serve(Settings.of(**values))


def run_check(registry: tuple[Path, ...]) -> int:
    return check(registry)


SERVE = click.Command(
    "serve",
    callback=run_serve,
    params=settings_options(),
    context_settings=CONTEXT,
    help="Start the server. Keys are best given in a file or the environment: a command line is visible to every "
    "user of the machine. A key file has one key per line; blank lines and lines starting with # are skipped.",
)
CHECK = click.Command(
    "check",
    callback=run_check,
    params=[registry_option()],
    context_settings=CONTEXT,
    help="Validate the registries and list every problem; exits 1 when an entry is invalid.",
)
CLI = click.Group(
    "clemproxy",
    commands=[SERVE, CHECK],
    context_settings=CONTEXT,
    help="OpenAI-compatible server for clembench model registries.",
)


def parse_serve(argv: Sequence[str]) -> Settings:
    """The settings ``clemproxy serve ARGV`` would run with (flags, then ``CLEMPROXY_*``, then defaults)."""
    with SERVE.make_context("serve", list(argv)) as ctx:
        return Settings.of(**ctx.params)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        result = CLI.main(args=argv, prog_name="clemproxy", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 1
    return result if isinstance(result, int) else 0


def check(registries: Sequence[Path]) -> int:
    """Print every problem, errors apart from warnings, entry by entry; 0 when there are no errors (warnings and
    entries of backends this server does not run never fail a check: clembench runs such a file)."""
    sources = registry_sources(registries)
    errors = 0
    for source in sources:
        try:
            registry = ModelRegistry.from_files([source])
        except RegistryFileError as exc:
            print(f"{exc}", file=sys.stdout)
            errors += 1
            continue
        invalid = [e for e in registry if e.errors]
        served = [e for e in registry if e.is_served and not registry.is_shadowed(e)]
        elsewhere = Counter(e.backend for e in registry if e.is_valid and e.not_served_reason)
        shadowed = sum(1 for e in registry if registry.is_shadowed(e))
        print(
            f"{source}: {len(registry)} entries: {len(served)} served here, {sum(elsewhere.values())} of backends "
            f"not served here, {len(invalid)} invalid, {shadowed} shadowed by an earlier entry of the same name"
        )
        for label in ("errors", "warnings"):
            listed = [(e, e.errors if label == "errors" else e.warnings) for e in registry]
            listed = [(e, problems) for e, problems in listed if problems]
            if listed:
                print(f"  {label}:")
            for entry, problems in listed:
                print(f"    #{entry.index} {entry.name} ({entry.backend or 'no backend'}):")
                for problem in problems:
                    print(f"      {problem}")
        if elsewhere:
            print("  not served here (valid entries; clembench runs them itself):")
            for backend, count in sorted(elsewhere.items(), key=lambda item: str(item[0])):
                print(f"    {backend}: {count} entries — {OTHER_BACKENDS.get(str(backend), 'unknown backend')}")
        errors += sum(len(e.errors) for e in invalid)
    print("OK" if not errors else f"{errors} error(s)")
    return 0 if not errors else 1


def serve(settings: Settings) -> int:
    from proxy.app import create_app

    try:
        settings = dataclasses.replace(settings, access=settings.access.with_key_files_read())
    except KeyFileError as exc:
        print(f"clemproxy: {exc}", file=sys.stderr)
        return 2
    server = settings.server
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
        server.host,
        server.port,
        ", ".join(str(p) for p in registry_sources(server.registry)),
    )
    services = app.state.services
    for line in services.access.describe():
        logger.info("%s", line)
    # uvicorn logs through our handler (log_config=None), so that its lines are redacted too. Our access log
    # (proxy.access_log) replaces uvicorn's: it carries the request id and the duration.
    config = uvicorn.Config(
        app, host=server.host, port=server.port, log_level=server.log_level, log_config=None, access_log=False
    )
    DrainingServer(config, services.manager, server.shutdown_timeout).run()
    return 0


def configure_logging(settings: Settings) -> None:
    """One handler on the root logger, whose formatter blanks out every key and token this server holds."""
    hidden = [*settings.access.api_key, *settings.access.admin_key, os.environ.get("HF_TOKEN", "")]
    with contextlib.suppress(CredentialsError):
        hidden.append(huggingface_token())
    upstream_key = key_section("openai_compatible")[0].get("api_key")
    if isinstance(upstream_key, str):
        hidden.append(upstream_key)
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", redact=hidden))
    logging.basicConfig(level=settings.server.log_level.upper(), handlers=[handler], force=True)


def exposure_allowed(settings: Settings) -> bool:
    """Without any key, listen on loopback only, unless told --insecure-no-auth; say which it is."""
    host = settings.server.host
    if settings.access.api_key or settings.access.admin_key:
        return True
    if is_loopback(host):
        logger.warning(
            "no API or admin key: listening on loopback (%s) only; anyone on this machine can use and manage "
            "the models (--api-key-file and --admin-key-file guard them)",
            host,
        )
        return True
    if not settings.access.insecure_no_auth:
        logger.error(
            "refusing to listen on %s without a key: anyone who can reach it could use and unload the models. "
            "Give --api-key-file (and --admin-key-file), or --insecure-no-auth where the network is yours alone",
            host,
        )
        return False
    logger.warning(
        "--insecure-no-auth: listening on %s with no key; anyone who can reach it can use and manage the models",
        host,
    )
    return True


class DrainingServer(uvicorn.Server):
    """uvicorn, with a graceful stop: on SIGTERM/SIGINT the server keeps listening but answers new requests with
    503, lets running ones finish for ``shutdown_timeout`` seconds, ends the rest with a clear error, unloads
    the models and exits 0. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, manager: ModelManager, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.manager = manager
        self.shutdown_timeout = shutdown_timeout
        self.draining: asyncio.Task[None] | None = None
        self.started_serving = False

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.started_serving = True  # the app's lifespan has run: there is something to drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler may interrupt anything, even a log write in progress: it only hands over to the loop.
        loop = getattr(self, "loop", None)
        if loop is None:
            self.should_exit = True
            return
        loop.call_soon_threadsafe(self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if self.draining is not None or not self.started_serving:
            self.should_exit = True  # no re-raised signal afterwards: a graceful stop exits 0
            self.force_exit = self.draining is not None
            return
        logger.info(
            "%s: no new requests; running ones have %.0f s to finish", signal.Signals(sig).name, self.shutdown_timeout
        )
        self.draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.manager.drain(self.shutdown_timeout)
        finally:
            self.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
