"""The admin page in a real browser: Debian's Chromium driven by Playwright, against a real server on the
bundled registry (plus one entry whose weights are missing). Screenshots go to tests/artifacts/admin/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from backends import ModelRegistry
from backends.registry.entries import bundled_registry_path
from proxy.settings import Settings
from tests.support import SMOL, RunningServer, smol_entry, wait_until, write_registry

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts" / "admin"
MISSING = "smol-missing-file"
# What the machine's probe found Chromium needs headless here: no sandbox as root, no calls home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    extra = write_registry(
        tmp_path_factory.mktemp("admin") / "model_registry.json", [smol_entry(MISSING, filename="*Q8_0.gguf")]
    )
    with RunningServer(ModelRegistry.from_files([bundled_registry_path(), extra])) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Debian's chromium is missing: apt-get install chromium (make test does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_admin(browser: Any, server: RunningServer, width: int, height: int) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": width, "height": height})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{server.base_url}/admin")
    page.wait_for_function("() => window.htmx !== undefined")
    return page, requested


def row(page: Any, name: str) -> Any:
    return page.locator(f"tr#m-{name.replace('.', '_')}")


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_load_use_unload_and_a_failing_load(browser: Any, admin_server: RunningServer) -> None:
    from playwright.sync_api import expect

    page, requested = open_admin(browser, admin_server, 1280, 900)
    smol = row(page, SMOL)
    expect(smol.locator(".badge")).to_have_text("unloaded")
    shot(page, "1-unloaded")

    smol.locator("button.load").click()
    expect(smol.locator(".badge")).to_have_text("loaded", timeout=60_000)  # no page reload: htmx swaps the row
    expect(smol).to_contain_text("cpu")
    expect(page.locator("#summary")).to_contain_text("1 of", timeout=10_000)
    shot(page, "2-loaded")

    client = openai.OpenAI(base_url=f"{admin_server.base_url}/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    expect(smol).to_contain_text("1 served", timeout=10_000)  # the loaded row refreshes itself
    expect(smol.locator(".last-used")).not_to_have_text("never")
    shot(page, "3-used")

    smol.locator("button.unload").click()
    expect(smol.locator(".badge")).to_have_text("unloaded", timeout=60_000)

    missing = row(page, MISSING)
    missing.locator("button.load").click()
    expect(missing.locator(".badge")).to_have_text("failed", timeout=60_000)
    expect(missing.locator(".error")).to_contain_text("*Q8_0.gguf")
    expect(missing.locator("button.load")).to_have_text("Retry")
    shot(page, "4-failed")

    page.reload()  # the same states after a full render
    expect(row(page, MISSING).locator(".badge")).to_have_text("failed")
    assert all(url.startswith(admin_server.base_url) for url in requested), "the page loaded something off-server"
    page.close()


def test_filter_and_gpu_options(browser: Any, admin_server: RunningServer) -> None:
    from playwright.sync_api import expect

    page, _ = open_admin(browser, admin_server, 1280, 900)
    page.fill("#filter", "huggingface")
    expect(row(page, SMOL)).to_be_hidden()
    expect(row(page, "SmolLM2-135M-Instruct")).to_be_visible()
    page.fill("#filter", "")
    expect(row(page, SMOL)).to_be_visible()
    # No GPU on this machine: the GPU choices are there but disabled, with the reason next to them.
    gpu_option = row(page, SMOL).locator("option[value=gpu]")
    expect(gpu_option).to_be_disabled()
    expect(row(page, SMOL)).to_contain_text("no GPU this backend can use here")
    page.close()


def test_phone_width_fits_the_screen(browser: Any, admin_server: RunningServer) -> None:
    from playwright.sync_api import expect

    page, _ = open_admin(browser, admin_server, 390, 844)
    expect(row(page, SMOL).locator("button.load")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
    shot(page, "5-phone")
    page.close()


def test_sign_in_then_load_and_unload(browser: Any, tmp_path: Path) -> None:
    """With an admin key the page asks for it once; the session cookie and the page's CSRF token then carry the
    htmx buttons, and signing out ends the session."""
    from playwright.sync_api import expect

    registry = ModelRegistry.from_files([write_registry(tmp_path / "model_registry.json", [smol_entry()])])
    with RunningServer(registry, Settings.of(admin_key=("browser-admin-key",))) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{server.base_url}/admin")
        expect(page).to_have_url(f"{server.base_url}/admin/login?next=%2Fadmin")
        page.fill("#key", "not-the-key")
        page.click("button[type=submit]")
        expect(page.locator(".error")).to_contain_text("not the admin key")
        page.fill("#key", "browser-admin-key")
        page.click("button[type=submit]")
        smol = row(page, SMOL)
        expect(smol.locator(".badge")).to_have_text("unloaded")
        assert not any(c["name"] == "clemproxy_session" and not c["httpOnly"] for c in page.context.cookies())
        page.wait_for_function("() => window.htmx !== undefined")
        smol.locator("button.load").click()
        expect(smol.locator(".badge")).to_have_text("loaded", timeout=60_000)
        smol.locator("button.unload").click()
        expect(smol.locator(".badge")).to_have_text("unloaded", timeout=60_000)
        shot(page, "6-signed-in")
        page.click(".sign-out button")
        expect(page.locator("#key")).to_be_visible()
        page.goto(f"{server.base_url}/admin")
        expect(page.locator("#key")).to_be_visible()  # signed out: back to the form
        page.close()


def test_a_downloads_progress_bar_moves_then_the_load_completes(browser: Any, tmp_path: Path) -> None:
    """The real huggingface_hub client in a server process fetches the demo GGUF from a stand-in hub on loopback,
    slowly; the row's progress bar fills by itself, and the model loads."""
    from playwright.sync_api import expect

    from tests.support import ServerProcess, smollm2_gguf
    from tests.support.hub import StandInHub

    gguf = smollm2_gguf()
    name = "smol-from-the-hub"
    entry = smol_entry(name, huggingface_id="stand-in/smollm2", python_package=None)
    with StandInHub({"stand-in/smollm2": {gguf.name: gguf}}, bytes_per_second=gguf.stat().st_size // 6) as hub:
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        with ServerProcess(write_registry(tmp_path / "model_registry.json", [entry]), env=env) as server:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{server.base_url}/admin")
            page.wait_for_function("() => window.htmx !== undefined")
            model = row(page, name)
            model.locator("button.load").click()
            bar = model.locator("progress.download")
            expect(bar).to_be_visible(timeout=30_000)
            first = float(bar.get_attribute("value") or 0)
            page.wait_for_function(
                f"() => Number(document.querySelector('tr#m-{name} progress.download')?.value ?? -1) > {first}",
                timeout=30_000,
            )
            expect(model.locator(".download-text")).to_contain_text("s left")
            shot(page, "7-downloading")
            expect(model.locator(".badge")).to_have_text("loaded", timeout=60_000)
            expect(bar).to_have_count(0)
            page.close()


def test_charts_appear_after_a_few_requests(browser: Any, tmp_path: Path) -> None:
    """Each loaded model's row draws its tokens/s, time to first token and queue as inline SVG, from the
    manager's own statistics; hovering a point tells its value."""
    import httpx
    from playwright.sync_api import expect

    registry = ModelRegistry.from_files([write_registry(tmp_path / "model_registry.json", [smol_entry()])])
    with RunningServer(registry, Settings.of(stats_interval=0.3)) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        for _ in range(4):
            client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)

        def series() -> list[dict[str, Any]]:
            return list(httpx.get(f"{server.base_url}/admin/api/models/{SMOL}").json()["series"])

        # The requests can all end within one interval; the sampler's next point then holds them.
        wait_until(lambda: len(series()) >= 2 and any(p["tokens_per_second"] > 0 for p in series()), "two points")
        points = series()
        assert any(p["ttft_ms"] for p in points) and all(p["queued"] == 0 for p in points)

        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{server.base_url}/admin")
        smol = row(page, SMOL)
        for key in ("tokens_per_second", "ttft_ms", "queued"):
            expect(smol.locator(f"figure.chart-{key} svg polyline")).to_have_count(1)
        dot = smol.locator("figure.chart-tokens_per_second circle").last
        expect(dot.locator("title")).to_contain_text("tokens/s")
        dot.hover()
        shot(page, "8-charts")
        assert not page.locator("script[src^=http]").count()  # no chart library from anywhere
        page.close()


def test_add_an_entry_in_the_form_and_an_invalid_edit_shows_its_errors(browser: Any, tmp_path: Path) -> None:
    """The registry editor: a new entry typed into the form is served at once; an invalid one shows its
    problems next to their fields and leaves the file as it was."""
    from playwright.sync_api import expect

    path = write_registry(tmp_path / "model_registry.json", [smol_entry()])
    with RunningServer(ModelRegistry.from_files([path]), Settings.of(admin_key=("editor-key",))) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{server.base_url}/admin")
        page.fill("#key", "editor-key")
        page.click("button[type=submit]")
        page.wait_for_function("() => window.htmx !== undefined")
        editor = page.locator("#editor")
        expect(editor).to_contain_text(str(path))

        row(page, SMOL).locator("button.duplicate-entry").click()
        form = page.locator("form.entry-form")
        expect(form.locator("input[name=model_name]")).to_have_value(f"{SMOL}-copy")
        form.locator("input[name=model_name]").fill("org/typed-in")
        form.locator("input[name=parallel]").fill("2")
        form.locator("button.save").click()
        typed = row(page, "org/typed-in".replace("/", "_"))
        expect(typed.locator(".badge")).to_have_text("unloaded", timeout=10_000)  # the page was drawn again
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="org/typed-in", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert reply.model == "org/typed-in"
        assert "org/typed-in" in path.read_text(encoding="utf-8")

        before = path.read_text(encoding="utf-8")
        page.locator("#editor button.add-entry").click()
        form = page.locator("form.entry-form")
        form.locator("input[name=model_name]").fill("broken")
        form.locator("input[name=eos_to_cull]").fill("(")
        form.locator("textarea[name=other]").fill('{"temperature": 5}')
        form.locator("button.save").click()
        expect(form.locator("label[data-key=eos_to_cull] .field-error")).to_contain_text("regular expression")
        expect(form.locator("label[data-key=huggingface_id] .field-error")).to_contain_text("missing")
        expect(form.locator("label[data-key=other] .field-error")).to_contain_text("temperature")
        shot(page, "9-editor-errors")
        assert path.read_text(encoding="utf-8") == before

        page.set_viewport_size({"width": 390, "height": 844})  # the form fits a phone too
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.close()
