"""The admin page's HTML over a real server: the full page, each fragment, representative states, and the
flows without JavaScript (form POST, then a redirect)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jinja2_fragments import render_block

from admin.rendering import ENVIRONMENT, TEMPLATE
from admin.views import decorate, row_id
from backends import ModelRegistry
from proxy.admin_api import entry_view
from tests.support import SMOL, AdminSession, RunningServer, smol_entry, write_registry

HX = {"hx-request": "true"}


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    entries = [
        smol_entry(),
        smol_entry("smol-missing-file", filename="*Q8_0.gguf"),
        smol_entry("broken-entry", eos_to_cull="(unclosed"),
        {**smol_entry("hub-only"), "python_package": None, "huggingface_id": "nobody/not-downloaded-GGUF"},
        {"model_name": "remote-model", "backend": "openai", "model_id": "gpt-4o"},
    ]
    entries[3] = {k: v for k, v in entries[3].items() if v is not None}
    path = write_registry(tmp_path_factory.mktemp("page") / "model_registry.json", entries)
    with RunningServer(ModelRegistry.from_files([path])) as server:
        yield server


def get(server: RunningServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(f"{server.base_url}{path}", timeout=60, **kwargs)


@pytest.fixture(scope="module")
def admin(page_server: RunningServer) -> AdminSession:
    return AdminSession(page_server.base_url)


def post(admin: AdminSession, path: str, **kwargs: Any) -> httpx.Response:
    return admin.post(path, **kwargs)


def test_full_page_shows_every_entry_and_its_state(page_server: RunningServer) -> None:
    page = get(page_server, "/admin")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for name in (SMOL, "smol-missing-file", "broken-entry", "hub-only", "remote-model"):
        assert f'id="{row_id(name)}"' in html
    assert "on disk · 98.4 MB" in html  # the shipped GGUF
    assert "not downloaded" in html  # the hub-only entry
    assert "eos_to_cull" in html  # the broken entry's problem
    assert "not served here" in html  # the remote entry
    assert "https://" not in html.split("<body>")[0]  # nothing from a CDN in the head
    assert 'src="/admin/static/htmx.min.js"' in html
    assert get(page_server, "/admin/static/htmx.min.js").status_code == 200


def test_filter_without_javascript(page_server: RunningServer) -> None:
    html = get(page_server, "/admin", params={"q": "missing"}).text
    assert row_id("smol-missing-file") in html and row_id(SMOL) not in html


def test_fragments(page_server: RunningServer) -> None:
    row = get(page_server, f"/admin/rows/{SMOL}", headers=HX).text
    assert row.lstrip().startswith(f'<tr id="{row_id(SMOL)}"') and "<html" not in row
    summary = get(page_server, "/admin/summary", headers=HX).text
    assert summary.lstrip().startswith('<p id="summary"') and "no GPU" in summary
    assert get(page_server, "/admin/rows/no-such-model").status_code == 404


def test_htmx_load_answers_with_the_row_at_once(page_server: RunningServer, admin: AdminSession) -> None:
    row = post(admin, f"/admin/models/{SMOL}/load", headers=HX, data={"placement": "entry"}).text
    assert row.lstrip().startswith(f'<tr id="{row_id(SMOL)}"')
    assert "badge-loading" in row or "badge-loaded" in row  # loading…, and the row polls until it is done
    assert 'hx-trigger="every' in row
    deadline = time.monotonic() + 60
    while "badge-loaded" not in get(page_server, f"/admin/rows/{SMOL}").text:
        assert time.monotonic() < deadline, "the load did not finish"
        time.sleep(0.05)
    row = get(page_server, f"/admin/rows/{SMOL}").text
    assert "slots 0/4 in use · 0 tokens cached of 16,384 (377.5 MB)" in row  # the engine's slots and KV cache
    unloaded = post(admin, f"/admin/models/{SMOL}/unload", headers=HX).text
    assert "badge-unload" in unloaded  # unloading… or unloaded


def test_forms_without_javascript_redirect_to_the_page(page_server: RunningServer, admin: AdminSession) -> None:
    loaded = post(admin, f"/admin/models/{SMOL}/load", data={"placement": "cpu"})
    assert loaded.status_code == 200 and loaded.history[0].status_code == 303  # POST, then redirect to the page
    assert str(loaded.url).endswith("/admin/")
    assert "badge-loaded" in get(page_server, f"/admin/rows/{SMOL}").text
    refused = post(admin, f"/admin/models/{SMOL}/load", headers=HX, data={"placement": "layers", "layers": "x"})
    assert "whole number" in refused.text
    conflict = post(admin, f"/admin/models/{SMOL}/load", headers=HX, data={"placement": "entry"})
    assert "unload it before" in conflict.text  # loaded on the CPU by request: a different placement is refused
    post(admin, f"/admin/models/{SMOL}/unload")
    failed = post(admin, "/admin/models/smol-missing-file/load")
    assert failed.status_code == 200
    row = get(page_server, "/admin/rows/smol-missing-file").text
    assert "badge-failed" in row and "*Q8_0.gguf" in row and "Retry" in row


@pytest.mark.parametrize("state", ["loading", "unloading", "loaded", "failed"])
def test_row_renders_each_state(state: str) -> None:
    registry = ModelRegistry.from_list([smol_entry()])
    entry = registry.lookup(SMOL)
    view = entry_view(registry, entry, None)
    loaded = {"device": "cpu", "dtype": None, "layers_on_gpu": 0, "layers_total": 31, "model_bytes": 96_576_768}
    view.update(
        state=state, error="it broke" if state == "failed" else None, loaded=loaded if state == "loaded" else None
    )
    view.update(requests_served=3, last_used=None, tokens_per_second=70.5 if state == "loaded" else None)
    html = render_block(ENVIRONMENT, TEMPLATE, "row", model=decorate(view, entry.spec, 0.0), action_error=None)
    assert f"badge-{state}" in html
    if state in ("loading", "unloading"):
        assert f"{state}…" in html and 'hx-trigger="every 1s"' in html and "button" not in html
    if state == "loading":  # a download can be cancelled from its row
        view.update(stage="downloading", download={"bytes_done": 10, "bytes_total": 100, "bytes_per_second": 5})
        downloading = render_block(ENVIRONMENT, TEMPLATE, "row", model=decorate(view, entry.spec, 0.0))
        assert 'value="10" max="100"' in downloading and "Cancel" in downloading and "10 B of 100 B" in downloading
    if state == "loaded":
        assert "0/31 layers on GPU" in html and "96.6 MB" in html and "70.5 tokens/s" in html and "Unload" in html
    if state == "failed":
        assert "it broke" in html and "Retry" in html


def test_templates_are_packaged() -> None:
    assert (Path(ENVIRONMENT.loader.searchpath[0]) / TEMPLATE).is_file()  # type: ignore[union-attr]
