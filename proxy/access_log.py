"""Request ids and the access log: one line per request, with the id echoed in ``x-request-id``.

A client's own ``x-request-id`` (letters, digits, ``-_.:``, at most 128) is kept, so that its logs and ours
join up; otherwise one is made. Query strings and bodies are never logged.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from proxy.metrics import Metrics

logger = logging.getLogger("clemproxy.access")

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SAFE_ID.fullmatch(candidate):
                return candidate
    return uuid.uuid4().hex


def route_of(scope: Scope) -> str:
    """The route's path template (``/admin/rows/{name:str}``), not the path: metric labels stay few."""
    return str(scope.get("path_template") or "unmatched")


def record_metrics(metrics: Metrics, scope: Scope, status: int, seconds: float) -> None:
    route = route_of(scope)
    model = str(scope.get("state", {}).get("model", "-"))
    metrics.requests.labels(route, model, str(status or "-")).inc()
    metrics.latency.labels(route).observe(seconds)


def access_log_middleware(metrics: Metrics) -> Callable[[ASGIApp], ASGIApp]:
    """Logs every request in one line and counts it in ``metrics``."""

    def wrap(app: ASGIApp) -> ASGIApp:
        return logged(app, metrics)

    return wrap


def logged(app: ASGIApp, metrics: Metrics) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.monotonic()
        status: dict[str, Any] = {"code": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            record_metrics(metrics, scope, status["code"], time.monotonic() - started)
            logger.info(
                "method=%s path=%s status=%s duration_ms=%.0f request_id=%s",
                scope.get("method", "-"),
                scope["path"],
                status["code"] or "-",
                (time.monotonic() - started) * 1000,
                request_id,
            )

    return middleware
