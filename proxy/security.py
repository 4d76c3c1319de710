"""Who may do what: API and admin keys, the admin session, and the browser checks (Host, Origin, CORS, CSRF).

Every route is closed unless it says otherwise. A route handler (or its controller) declares its ``Access``
level in ``opt={"access": ...}``; one app-wide guard, ``AccessControl.guard``, enforces it, and a handler that
declares nothing needs the admin key. The levels:

- ``open``: anyone (``/health``, static files, the sign-in form);
- ``api``: an API key once any is configured (``/v1``), the admin key works too;
- ``admin``: the admin key as a bearer token, or the admin page's session for reading (``/admin/api``,
  ``/metrics``);
- ``admin_page``: the admin key, or the session its sign-in starts; a browser without one is sent to sign in;
- ``sign_in``: anyone, but a form POST needs the page's CSRF token.

Without an admin key the API keys guard the admin side too; without any key everything is open, and the
CLI then listens on loopback only. A state-changing request authenticated by a session (or by nobody, on an
open server) also needs the CSRF token the page puts in its forms: a page on another site can send a form
to 127.0.0.1, but it cannot read the token.

``access_middleware`` runs before the guard, for what does not depend on who asks: the ``Host`` header must
name this server (a page whose DNS name is re-pointed at 127.0.0.1 gets a 400; handlers with
``opt={"any_host": True}``, like ``/health`` for container probes, answer any name), a browser may not make a
state-changing request from another origin, and CORS answers exist for ``/v1`` and the origins given with
``--cors-origin`` only. Litestar's own ``AllowedHostsConfig``, ``CORSConfig`` and ``CSRFConfig`` answer in
other shapes (a plain-text or ``{"message"}`` 400, a 403 without our code or htmx's refresh header) and
cannot scope CORS to one path or spare bearer-authenticated calls the CSRF token, so they are not used.

Keys are compared in constant time, by their digests, and never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Any
from urllib.parse import quote, urlsplit

from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.handlers import BaseRouteHandler
from litestar.response import Redirect
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import APIError, error_response

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

SESSION_COOKIE = "clemproxy_session"
CSRF_COOKIE = "clemproxy_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
LOGIN_PATH = "/admin/login"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000

CORS_METHODS = "GET, POST, OPTIONS"
CORS_EXPOSED = "x-request-id, retry-after"
CORS_MAX_AGE = "600"


class Access(StrEnum):
    """The access level a route handler declares in ``opt["access"]``; see the module's docstring."""

    OPEN = "open"
    API = "api"
    ADMIN = "admin"
    ADMIN_PAGE = "admin_page"
    SIGN_IN = "sign_in"


def requires(level: Access, **more: Any) -> dict[str, Any]:
    """The ``opt`` of a handler or controller at this level: ``opt=requires(Access.API)``."""
    return {"access": level, **more}


class SignInRequired(Exception):
    """A browser asked for an admin page without a session: it is sent to the sign-in form."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


def handle_sign_in_required(_: Request[Any, Any, Any], exc: SignInRequired) -> Response[Any]:
    return Redirect(path=exc.location, status_code=303)


class RedactingFormatter(logging.Formatter):
    """Blanks out the given secrets in every formatted line, tracebacks included: a second line of defence
    behind code that never logs a key (a library logging a URL with a token in it, say)."""

    def __init__(self, fmt: str, *, redact: Iterable[str]) -> None:
        super().__init__(fmt)
        self.secrets = sorted({s for s in redact if len(s) >= 4}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text


def is_loopback(host: str) -> bool:
    """Only what surely stays on this machine: ``localhost`` and loopback addresses. A name is not resolved."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """``Host`` without its port, lower-case: ``[::1]:8000`` -> ``::1``, ``Example.org.`` -> ``example.org``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def matches(given: str | None, digests: Sequence[bytes]) -> bool:
    """Constant-time membership: every configured key is compared, digests have one length."""
    if not given:
        return False
    candidate = digest(given)
    found = False
    for known in digests:
        found |= hmac.compare_digest(candidate, known)
    return found


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def auth_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """How the guard let a request in: ``open``, ``bearer`` or ``session``."""
    return str(connection.scope.get("state", {}).get("auth", "open"))


def unauthorized(token: str | None, needed: str) -> APIError:
    """A 401 in OpenAI's envelope; it never repeats the key it was given."""
    if token is None:
        message, code = f"This request needs {needed}: send it as 'Authorization: Bearer <key>'", "missing_api_key"
    else:
        message, code = f"The key given is not {needed}", "invalid_api_key"
    return APIError(401, message, code=code, headers={"WWW-Authenticate": 'Bearer realm="clemproxy"'})


def login_location(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    target = connection.url.path + (f"?{connection.url.query}" if connection.url.query else "")
    return f"{LOGIN_PATH}?next={quote(target, safe='')}"


class AccessControl:
    """The keys, sessions and browser rules of one server."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = (),
        admin_keys: Iterable[str] = (),
        bind_host: str = "127.0.0.1",
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
    ) -> None:
        api = [digest(k) for k in api_keys]
        admin = [digest(k) for k in admin_keys]
        self.api_open = not api  # /v1 without a key
        self.admin_open = not (admin or api)  # the admin side without a key
        self._api_digests = api + admin  # the admin key works for /v1 too
        self._admin_digests = admin or api  # without an admin key, the API keys guard the admin side
        self.admin_key_kind = "admin key" if admin else "API key"
        extra = [host_name(h) if h != "*" and not h.startswith("*.") else h.lower() for h in allowed_hosts]
        bind = [] if bind_host in WILDCARD_ADDRESSES else [host_name(bind_host)]
        self.allowed_hosts = tuple(dict.fromkeys([*LOOPBACK_NAMES, *bind, *extra]))
        self.cors_origins = tuple(origin.rstrip("/").lower() for origin in cors_origins)
        self._sessions: dict[str, float] = {}  # session id -> expiry (time.time())
        self._secret = secrets.token_bytes(32)  # signs CSRF tokens; new per process

    # --- keys ----------------------------------------------------------------------------------------

    def api_key_ok(self, key: str | None) -> bool:
        return self.api_open or matches(key, self._api_digests)

    def admin_key_ok(self, key: str | None) -> bool:
        return self.admin_open or matches(key, self._admin_digests)

    def owner_of(self, key: str | None) -> str:
        """Who owns what a request stores (a stored response): the digest of the key it came with, or "" for
        everyone on a server without API keys."""
        return "" if self.api_open or not key else digest(key).hex()

    # --- admin sessions ------------------------------------------------------------------------------

    def start_session(self) -> str:
        now = time.time()
        self._sessions = {sid: expiry for sid, expiry in self._sessions.items() if expiry > now}
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))  # the oldest
        session = secrets.token_urlsafe(32)
        self._sessions[session] = now + SESSION_SECONDS
        return session

    def session_ok(self, session: str | None) -> bool:
        expiry = self._sessions.get(session or "")
        return expiry is not None and expiry > time.time()

    def end_session(self, session: str | None) -> None:
        self._sessions.pop(session or "", None)

    # --- CSRF ----------------------------------------------------------------------------------------

    def csrf_token(self, cookie: str) -> str:
        """The token a page embeds for the browser holding ``cookie``: another site can read neither."""
        return hmac.new(self._secret, cookie.encode("utf-8"), hashlib.sha256).hexdigest()

    def csrf_ok(self, cookie: str | None, token: str | None) -> bool:
        return bool(cookie and token) and hmac.compare_digest(self.csrf_token(cookie or ""), token or "")

    # --- browser rules -------------------------------------------------------------------------------

    def host_ok(self, header: str | None) -> bool:
        if header is None:  # HTTP/1.0 without Host: not a browser, so not a rebinding attack
            return True
        name = host_name(header)
        for allowed in self.allowed_hosts:
            if allowed == "*" or name == allowed or (allowed.startswith("*.") and name.endswith(allowed[1:])):
                return True
        return False

    def cors_allows(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin.rstrip("/").lower() in self.cors_origins

    def describe(self) -> list[str]:
        """What a person starting the server should know, one line each; no key appears in them."""
        lines = [
            "/v1: open, no API key" if self.api_open else f"/v1: API key required ({len(self._api_digests)} accepted)",
            "admin page and /admin/api: open, no key"
            if self.admin_open
            else f"admin page and /admin/api: {self.admin_key_kind} required",
            f"Host names answered: {', '.join(self.allowed_hosts)} (add more with --allowed-host)",
        ]
        if self.cors_origins:
            lines.append(f"CORS for /v1 from: {', '.join(self.cors_origins)}")
        return lines

    # --- the guard -----------------------------------------------------------------------------------

    async def guard(self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        """Every route's guard: the handler's declared ``Access`` level, the admin key when it declares none.
        Records how the request authenticated in ``scope["state"]["auth"]``."""
        method = str(connection.scope.get("method", "GET"))
        if method == "OPTIONS":
            return  # Litestar's own answer (the Allow header) or the CORS preflight: no data, no credentials
        level = Access(handler.opt.get("access", Access.ADMIN))
        state = connection.scope.setdefault("state", {})
        token = bearer_token(connection)
        if level in (Access.OPEN, Access.SIGN_IN):
            state["auth"] = "open"
        elif level == Access.API:
            state["auth"] = "open" if self.api_open else "bearer"
            if not self.api_key_ok(token):
                raise unauthorized(token, "an API key")
        elif self.admin_open:
            state["auth"] = "open"
        elif token is not None and self.admin_key_ok(token):
            state["auth"] = "bearer"
        elif self.session_ok(connection.cookies.get(SESSION_COOKIE)) and (
            level == Access.ADMIN_PAGE or method in SAFE_METHODS
        ):
            state["auth"] = "session"
        elif level == Access.ADMIN_PAGE and token is None:
            if connection.headers.get("hx-request"):  # htmx follows HX-Redirect, also on a 401
                error = unauthorized(None, f"the {self.admin_key_kind}")
                error.headers["HX-Redirect"] = LOGIN_PATH
                raise error
            raise SignInRequired(login_location(connection))
        else:
            raise unauthorized(token, f"the {self.admin_key_kind}")
        if level in (Access.ADMIN_PAGE, Access.SIGN_IN) and method not in SAFE_METHODS and state["auth"] != "bearer":
            await self._require_csrf_token(connection)

    async def _require_csrf_token(self, connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        """The page's CSRF token, in the form field or the header htmx sends. A bearer key needs none: a browser
        never adds one on its own."""
        token = connection.headers.get(CSRF_HEADER)
        if token is None:
            form = await Request[Any, Any, Any](connection.scope, connection.receive).form()  # kept for the handler
            field = form.get(CSRF_FIELD)
            token = field if isinstance(field, str) else None
        if not self.csrf_ok(connection.cookies.get(CSRF_COOKIE), token):
            raise APIError(
                403,
                "The form's CSRF token is missing or out of date; reload the admin page and try again",
                code="csrf_token_invalid",
                headers={"HX-Refresh": "true"},  # htmx reloads the page, which brings a fresh token
            )

    # --- before the guard ----------------------------------------------------------------------------

    def browser_check(
        self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler | None, cors_prefix: str
    ) -> tuple[APIError | None, str | None]:
        """``(refusal, cors_origin)``: an error to answer with before any guard or handler runs, or ``None``;
        and the origin to grant CORS to."""
        host = connection.headers.get("host")
        any_host = handler is not None and handler.opt.get("any_host", False)
        if not any_host and not self.host_ok(host):
            return (
                APIError(
                    400,
                    f"This server does not answer to the host name '{host_name(host or '')}'; start it with "
                    "--allowed-host to add that name",
                    code="invalid_host",
                ),
                None,
            )
        path, method = connection.url.path, str(connection.scope.get("method", "GET"))
        in_api = path == cors_prefix or path.startswith(cors_prefix + "/")
        origin = connection.headers.get("origin")
        cross_origin = origin is not None and not same_origin(origin, host)
        cors_origin = origin if origin is not None and in_api and self.cors_allows(origin) else None
        preflight = method == "OPTIONS" and origin is not None and "access-control-request-method" in connection.headers
        if cross_origin and cors_origin is None and (preflight or method not in SAFE_METHODS):
            return (
                APIError(
                    403,
                    f"Cross-origin requests from {origin} are not allowed"
                    + (" (--cors-origin allows an origin for /v1)" if in_api else ""),
                    code="cross_origin_request",
                ),
                None,
            )
        return None, cors_origin


def same_origin(origin: str, host: str | None) -> bool:
    return host is not None and urlsplit(origin).netloc.lower() == host.strip().lower()


def cors_headers(origin: str) -> dict[str, str]:
    return {"access-control-allow-origin": origin, "access-control-expose-headers": CORS_EXPOSED, "vary": "Origin"}


def access_middleware(access: AccessControl, cors_prefix: str = "/v1") -> Any:
    """The ASGI middleware for ``access``'s browser rules: Host, Origin, and CORS for ``cors_prefix``."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def checked(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            request: Request[Any, Any, Any] = Request(scope, receive)
            refusal, cors_origin = access.browser_check(request, scope.get("route_handler"), cors_prefix)
            cors = cors_headers(cors_origin) if cors_origin is not None else {}
            answer: Response[Any] | None = None
            if refusal is not None:  # with CORS headers, readable by an allowed origin's page
                answer = error_response(refusal)
            elif cors_origin is not None and request.method == "OPTIONS":  # an allowed preflight
                cors |= {"access-control-allow-methods": CORS_METHODS, "access-control-max-age": CORS_MAX_AGE}
                if requested := request.headers.get("access-control-request-headers"):
                    cors["access-control-allow-headers"] = requested
                answer = Response(content=None, status_code=204)
            if answer is not None:
                await answer.to_asgi_response(None, request, headers=cors)(scope, receive, send)
                return

            async def send_with_cors(message: Message) -> None:
                if message["type"] == "http.response.start":
                    extra = [(name.encode(), value.encode("latin-1")) for name, value in cors.items()]
                    message["headers"] = [*message.get("headers", []), *extra]
                await send(message)

            await app(scope, receive, send_with_cors if cors else send)

        return checked

    return middleware
