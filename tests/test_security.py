"""Access, browser safety, limits and secrets, against real ``clemproxy serve`` processes.

``guarded`` listens on every interface with an API key file, an admin key file, a CORS origin, an extra Host
name and tight limits; a Hugging Face token is planted in ``key.json`` and ``HF_TOKEN``. ``unguarded`` has no
key at all, as a user on a workstation starts it. The real model answers where a request gets through.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from backends import ModelRegistry
from proxy.cli import parse_serve
from proxy.security import RedactingFormatter, host_name, is_loopback
from proxy.settings import Settings, read_key_file
from tests.support import (
    SMOL,
    AdminSession,
    RunningServer,
    ServerProcess,
    csrf_token_in,
    free_port,
    smol_entry,
    write_registry,
)

API_KEY = f"sk-planted-api-{secrets.token_hex(12)}"
ADMIN_KEY = f"planted-admin-{secrets.token_hex(12)}"
HF_TOKEN_FILE = f"hf_plantedfile{secrets.token_hex(12)}"
HF_TOKEN_ENV = f"hf_plantedenv{secrets.token_hex(12)}"
PLANTED = (API_KEY, ADMIN_KEY, HF_TOKEN_FILE, HF_TOKEN_ENV)
GATED = "gated-hub-model"
APP_ORIGIN = "https://app.example.org"
EVIL_ORIGIN = "https://evil.example.net"
HI = [{"role": "user", "content": "Say hi."}]
TIMEOUT_S = 2


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("guarded")
    gated = {
        "model_name": GATED,
        "backend": "huggingface_local",
        "huggingface_id": "example-org/gated-model",
        "premade_chat_template": True,
        "eos_to_cull": "<|im_end|>",
    }
    registry = write_registry(folder / "model_registry.json", [smol_entry(), {**gated, "requires_api_key": True}])
    (folder / "api-keys.txt").write_text(f"# keys for the team\n\n{API_KEY}\n", encoding="utf-8")
    (folder / "admin-key.txt").write_text(ADMIN_KEY + "\n", encoding="utf-8")
    (folder / "key.json").write_text(json.dumps({"huggingface": {"api_key": HF_TOKEN_FILE}}), encoding="utf-8")
    flags = [
        "--api-key-file", str(folder / "api-keys.txt"),
        "--admin-key-file", str(folder / "admin-key.txt"),
        "--cors-origin", APP_ORIGIN,
        "--allowed-host", "clemproxy.test",
        "--max-messages", "8",
        "--max-tokens-limit", "1000",
        "--request-timeout", str(TIMEOUT_S),
        "--log-level", "debug",
    ]  # fmt: skip
    with ServerProcess(registry, *flags, host="0.0.0.0", env={"HF_TOKEN": HF_TOKEN_ENV}) as server:
        yield server


@pytest.fixture(scope="module")
def unguarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    registry = write_registry(tmp_path_factory.mktemp("unguarded") / "model_registry.json", [smol_entry()])
    with ServerProcess(registry) as server:
        yield server


def client(server: ServerProcess, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key or "none", max_retries=0, timeout=120)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


# --- access ------------------------------------------------------------------------------------------


def test_v1_without_a_key_is_401(guarded: ServerProcess) -> None:
    missing = httpx.post(f"{guarded.base_url}/v1/chat/completions", json={"model": SMOL, "messages": HI})
    error = assert_error(missing, 401, "missing_api_key")
    assert "Authorization: Bearer" in error["message"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert_error(httpx.get(f"{guarded.base_url}/v1/models"), 401, "missing_api_key")
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(guarded, "sk-wrong").models.list()
    assert wrong.value.code == "invalid_api_key"


def test_v1_with_the_api_key_or_the_admin_key_answers(guarded: ServerProcess) -> None:
    for key in (API_KEY, ADMIN_KEY):
        answer = client(guarded, key).chat.completions.create(model=SMOL, messages=HI, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content


def test_the_api_key_does_not_open_the_admin_side(guarded: ServerProcess) -> None:
    for path in ("/admin/api/models", "/metrics"):
        assert_error(httpx.get(f"{guarded.base_url}{path}"), 401, "missing_api_key")
        assert_error(httpx.get(f"{guarded.base_url}{path}", headers=bearer(API_KEY)), 401, "invalid_api_key")
        assert httpx.get(f"{guarded.base_url}{path}", headers=bearer(ADMIN_KEY)).status_code == 200
    unload = f"{guarded.base_url}/admin/api/models/{SMOL}/unload"
    assert_error(httpx.post(unload, headers=bearer(API_KEY)), 401, "invalid_api_key")
    assert httpx.post(unload, headers=bearer(ADMIN_KEY), timeout=60).json()["state"] == "unloaded"
    page = httpx.get(f"{guarded.base_url}/admin/", headers=bearer(API_KEY))
    assert page.status_code == 401


def test_admin_page_sends_a_browser_to_sign_in(guarded: ServerProcess) -> None:
    page = httpx.get(f"{guarded.base_url}/admin/?q=smol")
    assert page.status_code == 303 and page.headers["location"] == "/admin/login?next=%2Fadmin%3Fq%3Dsmol"
    polled = httpx.get(f"{guarded.base_url}/admin/summary", headers={"hx-request": "true"})
    assert polled.status_code == 401 and polled.headers["hx-redirect"] == "/admin/login"
    assert httpx.get(f"{guarded.base_url}/admin/static/admin.css").status_code == 200  # the login page's style

    browser = httpx.Client(base_url=guarded.base_url, timeout=60)
    login = browser.get("/admin/login")
    assert login.status_code == 200 and 'type="password"' in login.text
    token = csrf_token_in(login.text)
    wrong = browser.post("/admin/login", data={"key": API_KEY, "csrf_token": token})
    assert wrong.status_code == 401 and "not the admin key" in wrong.text
    assert "clemproxy_session" not in wrong.headers.get("set-cookie", "")
    outside = browser.post("/admin/login", data={"key": ADMIN_KEY, "csrf_token": token, "next": "//evil.example"})
    assert outside.status_code == 303 and outside.headers["location"] == "/admin/"  # never to another site
    cookie = outside.headers["set-cookie"]
    assert cookie.startswith("clemproxy_session=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert ADMIN_KEY not in cookie
    assert browser.get("/admin/").status_code == 200
    assert browser.get("/admin/api/models").status_code == 200  # the page's JSON link, read with the session
    assert_error(browser.post(f"/admin/api/models/{SMOL}/unload"), 401, "missing_api_key")  # writing needs the key


def test_admin_form_posts_need_the_csrf_token(guarded: ServerProcess) -> None:
    admin = AdminSession(guarded.base_url, key=ADMIN_KEY)
    unload = f"/admin/models/{SMOL}/unload"
    assert_error(admin.client.post(unload), 403, "csrf_token_invalid")
    assert_error(admin.client.post(unload, data={"csrf_token": "0" * 64}), 403, "csrf_token_invalid")
    htmx = admin.client.post(unload, headers={"hx-request": "true"})
    assert htmx.status_code == 403 and htmx.headers["hx-refresh"] == "true"  # htmx reloads for a fresh token
    assert admin.post(unload).status_code == 200  # with the page's token: done, then back to the page
    assert admin.client.post(unload, headers={"hx-request": "true", "x-csrf-token": admin.token}).status_code == 200
    # The login form and signing out are guarded the same way.
    assert_error(admin.client.post("/admin/login", data={"key": ADMIN_KEY}), 403, "csrf_token_invalid")
    assert_error(admin.client.post("/admin/login/logout"), 403, "csrf_token_invalid")
    signed_out = admin.post("/admin/login/logout")
    assert signed_out.url.path == "/admin/login"
    assert admin.client.get("/admin/", follow_redirects=False).status_code == 303


def test_a_host_name_not_allowed_is_400(guarded: ServerProcess) -> None:
    for path in ("/v1/models", "/admin/", "/admin/api/models", "/metrics"):
        rebound = httpx.get(f"{guarded.base_url}{path}", headers={**bearer(ADMIN_KEY), "host": "attacker.example"})
        error = assert_error(rebound, 400, "invalid_host")
        assert "--allowed-host" in error["message"]
    probe = httpx.get(f"{guarded.base_url}/health", headers={"host": "10.1.2.3:8000"})  # a container's probe
    assert probe.status_code == 200
    for host in ("clemproxy.test", f"clemproxy.test:{guarded.port}", "localhost", f"[::1]:{guarded.port}"):
        assert httpx.get(f"{guarded.base_url}/v1/models", headers={**bearer(API_KEY), "host": host}).status_code == 200


def test_cors_is_for_v1_and_the_configured_origin_only(guarded: ServerProcess) -> None:
    def preflight(path: str, origin: str) -> httpx.Response:
        headers = {
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-stainless-os",
        }
        return httpx.options(f"{guarded.base_url}{path}", headers=headers)

    allowed = preflight("/v1/chat/completions", APP_ORIGIN)
    assert allowed.status_code == 204 and allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-stainless-os" in allowed.headers["access-control-allow-headers"]
    assert "POST" in allowed.headers["access-control-allow-methods"]
    no_key = httpx.get(f"{guarded.base_url}/v1/models", headers={"origin": APP_ORIGIN})
    assert no_key.status_code == 401 and no_key.headers["access-control-allow-origin"] == APP_ORIGIN  # readable
    for path, origin in (("/v1/chat/completions", EVIL_ORIGIN), (f"/admin/api/models/{SMOL}/load", APP_ORIGIN)):
        refused = preflight(path, origin)
        assert_error(refused, 403, "cross_origin_request")
        assert "access-control-allow-origin" not in refused.headers

    body = {"model": SMOL, "messages": HI, "max_tokens": 4, "temperature": 0}
    answered = httpx.post(
        f"{guarded.base_url}/v1/chat/completions", json=body, headers={**bearer(API_KEY), "origin": APP_ORIGIN}
    )
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-request-id" in answered.headers["access-control-expose-headers"]
    denied = httpx.get(f"{guarded.base_url}/v1/models", headers={**bearer(API_KEY), "origin": EVIL_ORIGIN})
    assert denied.status_code == 200 and "access-control-allow-origin" not in denied.headers  # the browser hides it


def test_an_unguarded_server_stays_on_loopback_and_says_so(unguarded: ServerProcess) -> None:
    assert "listening on loopback (127.0.0.1) only" in unguarded.log()
    assert httpx.get(f"{unguarded.base_url}/admin/").status_code == 200  # no sign-in without a key
    assert httpx.get(f"{unguarded.base_url}/admin/login", follow_redirects=False).status_code == 303


def test_cross_site_posts_are_refused_without_any_key(unguarded: ServerProcess) -> None:
    """A page on another site can send a form to 127.0.0.1; with no key to stop it, Origin and the CSRF token do."""
    base = unguarded.base_url
    form = {"placement": "cpu"}
    assert_error(httpx.post(f"{base}/admin/models/{SMOL}/load", data=form), 403, "csrf_token_invalid")
    cross = {"origin": EVIL_ORIGIN}
    for path in (f"/admin/models/{SMOL}/load", f"/admin/api/models/{SMOL}/load", "/v1/chat/completions"):
        assert_error(httpx.post(f"{base}{path}", data=form, headers=cross), 403, "cross_origin_request")
    same = {"origin": base}
    admin = AdminSession(base)
    assert admin.post(f"/admin/models/{SMOL}/unload", headers=same).status_code == 200


def test_no_key_on_a_public_address_refuses_to_start(tmp_path: Path) -> None:
    registry = write_registry(tmp_path / "model_registry.json", [smol_entry()])
    command = [sys.executable, "-m", "proxy.cli", "serve", "--registry", str(registry), "--port", str(free_port())]
    refused = subprocess.run([*command, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a key" in refused.stderr and "--insecure-no-auth" in refused.stderr
    with ServerProcess(registry, "--insecure-no-auth", host="0.0.0.0") as server:
        assert "--insecure-no-auth: listening on 0.0.0.0 with no key" in server.log()
        assert server.stop(signal.SIGTERM) == 0
    missing = subprocess.run(
        [*command, "--api-key-file", str(tmp_path / "nope.txt")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "cannot read key file" in missing.stderr


# --- limits ------------------------------------------------------------------------------------------


def test_too_many_messages_is_400(guarded: ServerProcess) -> None:
    messages: Any = [{"role": "user", "content": "hi"}] * 9
    with pytest.raises(openai.BadRequestError) as refused:
        client(guarded, API_KEY).chat.completions.create(model=SMOL, messages=messages, max_tokens=4)
    assert refused.value.code == "too_many_messages" and refused.value.param == "messages"
    assert "--max-messages" in str(refused.value)


def test_max_tokens_above_the_ceiling_is_400(guarded: ServerProcess) -> None:
    api = client(guarded, API_KEY)
    for param in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model=SMOL, messages=HI, **{param: 1001})  # type: ignore[call-overload]
        assert refused.value.code == "max_tokens_too_large" and refused.value.param == param
    with pytest.raises(openai.BadRequestError) as legacy:
        api.completions.create(model=SMOL, prompt="Once upon a time", max_tokens=5000)
    assert legacy.value.code == "max_tokens_too_large"


def test_a_request_past_the_timeout_ends_with_504_and_the_server_goes_on(guarded: ServerProcess) -> None:
    # At temperature 2 the small model rambles on: 1000 tokens take far longer than the timeout here.
    api = client(guarded, API_KEY)
    rambling: dict[str, Any] = {"model": SMOL, "messages": HI, "max_tokens": 1000, "temperature": 2.0, "seed": 1}
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as timed_out:
        api.chat.completions.create(**rambling)
    assert timed_out.value.status_code == 504 and timed_out.value.code == "request_timeout"
    assert timed_out.value.response.headers["x-should-retry"] == "false"  # the SDKs would only time out again
    assert time.monotonic() - started < TIMEOUT_S + 5

    with api.chat.completions.create(**rambling, stream=True) as stream:
        events = [line for line in stream.response.iter_lines() if line]
    data = [json.loads(line[6:]) for line in events if line.startswith("data: {")]
    assert data[-1]["error"]["code"] == "request_timeout" and events[-1] == "data: [DONE]"
    assert client(guarded, API_KEY).chat.completions.create(model=SMOL, messages=HI, max_tokens=4).choices


# --- secrets -----------------------------------------------------------------------------------------


def test_planted_secrets_appear_nowhere(guarded: ServerProcess) -> None:
    """Keys and Hugging Face tokens: not in any response (pages, JSON, errors, metrics) nor in the log."""
    admin = AdminSession(guarded.base_url, key=ADMIN_KEY)
    failed_load = httpx.post(f"{guarded.base_url}/admin/api/models/{GATED}/load", headers=bearer(ADMIN_KEY), timeout=60)
    assert failed_load.status_code >= 400  # offline: the gated repo cannot be fetched
    chat = httpx.post(
        f"{guarded.base_url}/v1/chat/completions",
        json={"model": GATED, "messages": HI},
        headers=bearer(API_KEY),
        timeout=60,
    )
    responses = [
        failed_load,
        chat,
        admin.get("/admin/"),
        admin.get("/admin/api/models"),
        admin.get(f"/admin/api/models/{GATED}"),
        admin.get(f"/admin/rows/{GATED}", headers={"hx-request": "true"}),
        httpx.get(f"{guarded.base_url}/metrics", headers=bearer(ADMIN_KEY)),
        httpx.get(f"{guarded.base_url}/health"),
        httpx.get(f"{guarded.base_url}/v1/models", headers=bearer(API_KEY)),
        httpx.get(f"{guarded.base_url}/v1/models", headers=bearer(API_KEY + "x")),
        httpx.get(f"{guarded.base_url}/admin/api/models", headers=bearer(API_KEY)),
    ]
    assert GATED in admin.get("/admin/").text and "gated" in failed_load.text.lower()
    log = guarded.log()
    assert "DEBUG" in log and "method=POST path=/v1/chat/completions" in log  # the log is there, and verbose
    assert "using the Hugging Face token from" in log  # the gated load did read the token
    for secret in PLANTED:
        for response in responses:
            assert secret not in response.text and secret not in str(response.headers), response.request.url
        assert secret not in log


def test_the_log_formatter_blanks_out_secrets() -> None:
    formatter = RedactingFormatter("%(message)s", redact=[API_KEY, "abc"])  # too short to redact safely
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "url https://hub/?token=%s abc", (API_KEY,), None)
    assert formatter.format(record) == "url https://hub/?token=[redacted] abc"


# --- parts -------------------------------------------------------------------------------------------


def test_host_names_and_loopback() -> None:
    assert [host_name(h) for h in ("LocalHost:8000", "[::1]:8000", "::1", "example.org.", "10.0.0.1")] == [
        "localhost",
        "::1",
        "::1",
        "example.org",
        "10.0.0.1",
    ]
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org", "localhost.evil.net"))


def test_key_files_skip_comments_and_refuse_to_be_empty(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\n\n  key-one  \nkey-two\n", encoding="utf-8")
    assert read_key_file(keys) == ["key-one", "key-two"]
    keys.write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(Exception, match="has no key in it"):
        read_key_file(keys)


def test_keys_come_from_flags_the_environment_and_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text("from-file\n", encoding="utf-8")
    settings = parse_serve(["--api-key", "from-flag", "--api-key", " ", "--api-key-file", "keys.txt"])
    monkeypatch.chdir(tmp_path)
    assert settings.access.with_key_files_read().api_key == ("from-flag", "from-file")  # an empty key is no key
    monkeypatch.setenv("CLEMPROXY_ADMIN_KEY", "env-one, env-two")
    assert parse_serve([]).access.with_key_files_read().admin_key == ("env-one", "env-two")


def test_key_files_guard_a_server_built_without_the_cli(tmp_path: Path) -> None:
    """create_app reads the key files itself: settings naming one never give an open server."""
    (tmp_path / "keys.txt").write_text("file-key\n", encoding="utf-8")
    settings = Settings.of(api_key_file=(tmp_path / "keys.txt",))
    with RunningServer(ModelRegistry.from_list([smol_entry()]), settings) as server:
        assert_error(httpx.get(f"{server.base_url}/v1/models"), 401, "missing_api_key")
        assert httpx.get(f"{server.base_url}/v1/models", headers=bearer("file-key")).status_code == 200


def test_access_flags_and_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_serve([])
    access, limits = settings.access, settings.limits
    assert (access.api_key, access.insecure_no_auth) == ((), False)
    assert (limits.max_messages, limits.max_tokens_limit) == (2048, 0)
    assert settings.manager.request_timeout == 600
    monkeypatch.setenv("CLEMPROXY_INSECURE_NO_AUTH", "1")
    monkeypatch.setenv("CLEMPROXY_REQUEST_TIMEOUT", "30")
    settings = parse_serve(["--api-key", "a", "--api-key", "b", "--cors-origin", APP_ORIGIN])
    access = settings.access
    assert (access.api_key, access.cors_origin, access.insecure_no_auth, settings.manager.request_timeout) == (
        ("a", "b"),
        (APP_ORIGIN,),
        True,
        30,
    )
    assert "'a'" not in repr(settings)  # keys never show in a repr (or a log line)
