"""Editing the registry through ``/admin/api/registry``: a real server on a registry file in a temp folder, the
real model served from an entry added a moment before, and a save killed between writing and renaming."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends import ModelRegistry
from tests.support import COUNTING, SMOL, RunningServer, smol_entry, wait_until

SLASHED = "org/smol-edited"


def write_file(path: Path) -> str:
    """A registry as a person writes one: four-space indents, one entry under model_config, keys in their order."""
    entries = [
        {"model_name": SMOL, "backend": "llamacpp", **{k: v for k, v in smol_entry().items() if k != "model_name"}},
        {
            "backend": "llamacpp",
            "model_name": "nested",
            "model_config": {
                "huggingface_id": "a/b",
                "filename": "*.gguf",
                "premade_chat_template": True,
                "eos_to_cull": "</s>",
            },
        },
    ]
    text = json.dumps(entries, indent=4) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


@pytest.fixture
def edited(tmp_path: Path) -> Any:
    path = tmp_path / "model_registry.json"
    original = write_file(path)
    with RunningServer(ModelRegistry.from_files([path])) as server:
        yield server, path, original


def registry_of(server: RunningServer) -> httpx.Response:
    answer = httpx.get(f"{server.base_url}/admin/api/registry")
    assert answer.status_code == 200, answer.text
    return answer


def put(server: RunningServer, name: str, entry: Any, version: str | None) -> httpx.Response:
    headers = {"if-match": f'"{version}"'} if version else {}
    return httpx.put(f"{server.base_url}/admin/api/registry/entries/{name}", json=entry, headers=headers, timeout=60)


def test_an_added_entry_is_served_at_once_and_the_file_keeps_its_layout(edited: Any) -> None:
    server, path, original = edited
    answer = registry_of(server)
    version = answer.json()["version"]
    assert answer.headers["etag"] == f'"{version}"' and answer.json()["editable"] is True
    assert answer.json()["entries"] == json.loads(original)

    saved = put(server, SLASHED, smol_entry(SLASHED, parallel=2), version)
    assert saved.status_code == 200, saved.text
    text = path.read_text(encoding="utf-8")
    assert text.startswith(original[: original.rindex("}") + 1].rstrip("\n"))  # the old entries, byte for byte
    assert '\n    {\n        "model_name": "org/smol-edited"' in text and text.endswith("}\n]\n")
    assert path.with_name("model_registry.json.bak").read_text(encoding="utf-8") == original
    assert registry_of(server).json()["version"] == saved.json()["version"] != version

    from openai import OpenAI

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=SLASHED, messages=COUNTING, max_tokens=4, temperature=0)
    assert reply.model == SLASHED and reply.usage.completion_tokens == 4
    row = httpx.get(f"{server.base_url}/admin/api/models/{SLASHED}").json()
    assert row["state"] == "loaded" and row["loaded"]["slots"] == 2
    assert httpx.post(f"{server.base_url}/admin/api/models/{SLASHED}/unload", timeout=60).json()["state"] == "unloaded"
    assert httpx.post(f"{server.base_url}/admin/api/models/{SLASHED}/load", timeout=60).json()["state"] == "loaded"
    page = httpx.get(f"{server.base_url}/admin/rows/{SLASHED}")
    assert page.status_code == 200 and f"/admin/models/{SLASHED}/unload" in page.text


def test_an_invalid_entry_is_a_400_listing_every_problem_and_the_file_is_untouched(edited: Any) -> None:
    server, path, original = edited
    bad = {"model_name": "broken", "backend": "llamacpp", "eos_to_cull": "(", "execute_on": "tpu"}
    answer = put(server, "broken", bad, None)
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    for key in ("huggingface_id", "filename", "eos_to_cull", "execute_on", "premade_chat_template"):
        assert key in message
    assert put(server, "other-name", smol_entry("broken"), None).status_code == 400  # the name must match
    assert path.read_text(encoding="utf-8") == original
    assert not path.with_name("model_registry.json.bak").exists()


def test_an_edit_from_a_stale_version_is_a_409(edited: Any) -> None:
    server, path, _ = edited
    version = registry_of(server).json()["version"]
    assert put(server, "first", smol_entry("first"), version).status_code == 200
    stale = put(server, "second", smol_entry("second"), version)  # a second browser, from the same start
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "registry_conflict"
    assert "second" not in path.read_text(encoding="utf-8") and "first" in path.read_text(encoding="utf-8")


def test_a_deleted_entrys_model_finishes_its_requests_then_unloads(edited: Any) -> None:
    server, path, _ = edited
    body = {"model": SMOL, "messages": COUNTING, "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        while '"content":"' not in next(lines):
            pass
        deleted = httpx.delete(f"{server.base_url}/admin/api/registry/entries/{SMOL}", timeout=60)
        assert deleted.status_code == 200, deleted.text
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join(rest)  # it ran to its end
    wait_until(lambda: SMOL not in httpx.get(f"{server.base_url}/health").json()["loaded"], "unloaded", 30)
    assert httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "stream": False}).status_code == 404
    assert SMOL not in [e.get("model_name") for e in json.loads(path.read_text(encoding="utf-8"))]
    assert httpx.delete(f"{server.base_url}/admin/api/registry/entries/{SMOL}").status_code == 404


def test_a_loaded_models_changed_entry_waits_for_a_reload(edited: Any) -> None:
    server, _, _ = edited
    assert httpx.post(f"{server.base_url}/admin/api/models/{SMOL}/load", timeout=60).json()["loaded"]["slots"] == 4
    assert put(server, SMOL, smol_entry(parallel=2), None).status_code == 200
    row = httpx.get(f"{server.base_url}/admin/api/models/{SMOL}").json()
    assert row["state"] == "loaded" and row["entry_changed"] is True and row["loaded"]["slots"] == 4
    assert "entry changed, reload to apply" in httpx.get(f"{server.base_url}/admin/").text
    httpx.post(f"{server.base_url}/admin/api/models/{SMOL}/unload", timeout=60)
    reloaded = httpx.post(f"{server.base_url}/admin/api/models/{SMOL}/load", timeout=60).json()
    assert reloaded["loaded"]["slots"] == 2 and reloaded["entry_changed"] is False

    assert put(server, SMOL, smol_entry(parallel=2, temperature=0.0), None).status_code == 200
    row = httpx.get(f"{server.base_url}/admin/api/models/{SMOL}").json()
    assert row["entry_changed"] is False  # a request-time key applies at once, to the loaded model


def test_a_crash_between_writing_and_renaming_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model_registry.json"
    original = write_file(path)
    crash = textwrap.dedent(
        f"""
        import os, pathlib
        from backends.registry import file as registry_file
        registry_file.replace = lambda source, target: os._exit(3)  # the process dies with the new file written
        registry_file.RegistryFile(pathlib.Path({str(path)!r})).put("crash", {smol_entry("crash")!r}, None)
        """
    )
    assert subprocess.run([sys.executable, "-c", crash], cwd=Path(__file__).parents[1]).returncode == 3
    assert path.read_text(encoding="utf-8") == original
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1  # the new version, written in full but never renamed
    assert len(ModelRegistry.from_files([path])) == 2


def test_the_bundled_registry_is_not_edited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with RunningServer(ModelRegistry.from_sources()) as server:
        assert registry_of(server).json()["editable"] is False
        refused = put(server, "x", smol_entry("x"), None)
        assert refused.status_code == 409 and "bundled" in refused.json()["error"]["message"]
    with RunningServer(ModelRegistry.from_list([smol_entry()])) as server:  # no file at all
        assert put(server, "x", smol_entry("x"), None).status_code == 409


def test_the_editor_form_gives_back_the_entry_as_it_was_written() -> None:
    from admin.editor import EntryForm

    nested = {
        "model_name": "n",
        "backend": "llamacpp",
        "model_config": {"huggingface_id": "a/b", "filename": "*.gguf", "premade_chat_template": True, "seed": 1},
        "release_date": "2024",
    }
    form = EntryForm.of_entry(nested, "n", "v1")
    assert form.values["huggingface_id"] == "a/b" and form.values["premade_chat_template"] == "true"
    assert json.loads(form.other) == {"model_config": {"seed": 1}, "release_date": "2024"}
    again = EntryForm.of_form({**form.values, "other": form.other, "nested": ",".join(form.nested)}).entry()
    assert again is not None and json.dumps(again, sort_keys=True) == json.dumps(nested, sort_keys=True)
    assert again["model_config"]["huggingface_id"] == "a/b"  # back where it was
