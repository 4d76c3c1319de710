"""GGUF files converted once for transformers: the real demo GGUF converted by transformers into the cache, a
model loaded from the cache against one converted afresh, two processes sharing one conversion, a server whose
admin page and API show and clear the cache; and the cache's own bookkeeping (a crash mid-save, the size bound,
entries in use), with a small writer in place of transformers where only the bookkeeping is at stake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends import LoadOptions, ModelRegistry
from backends.weights.convert_cache import MARKER, ORIGIN, ConversionInUse, ConvertCache
from proxy.settings import Settings
from tests.support import (
    CONVERT_CACHE,
    COUNTING,
    GREEDY,
    SMOL_HF_GGUF,
    RunningServer,
    bundled_entry,
    csrf_token_in,
    generate,
    loaded,
    smollm2_gguf,
)

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Name three colors.", "<|im_start|>user\nHällo, wörld! 🎲<|im_end|>\n", "  spaces\tand\nlines  ", "1, 2, 3"]


def test_a_cached_conversion_gives_the_same_tokens_and_logits_as_converting_afresh(smol_hf_gguf: Any) -> None:
    """``smol_hf_gguf`` is the bundled entry loaded as the server loads it: from the tests' conversion cache."""
    import torch

    assert smol_hf_gguf.load_info()["weights_from"].startswith(ORIGIN)
    assert smol_hf_gguf.load_info()["converted_from"] == str(smollm2_gguf())
    assert Path(smol_hf_gguf.load_info()["source"]).parent == CONVERT_CACHE
    with loaded(bundled_entry(SMOL_HF_GGUF), options=LoadOptions(convert_cache="none")) as fresh:
        assert fresh.load_info()["converted_from"] is None and fresh.load_info()["source"].endswith(".gguf")
        for text in TEXTS:
            assert fresh.tokenize_prompt(text) == smol_hf_gguf.tokenize_prompt(text)
        prompt = fresh.prepare(COUNTING, GREEDY)
        assert smol_hf_gguf.prepare(COUNTING, GREEDY).token_ids == prompt.token_ids
        assert smol_hf_gguf.chat_template.source == fresh.chat_template.source
        assert (smol_hf_gguf.chat_template.bos_token, smol_hf_gguf.chat_template.eos_token) == (
            fresh.chat_template.bos_token,
            fresh.chat_template.eos_token,
        )
        ids = torch.tensor([prompt.token_ids])
        with torch.no_grad():
            expected = fresh._model(ids).logits
            got = smol_hf_gguf._model(ids).logits
        assert torch.equal(expected, got)
        assert generate(smol_hf_gguf)[0] == generate(fresh)[0]


CONVERT_IN_A_PROCESS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from backends.weights.convert_cache import ConvertCache, convert_gguf
    gguf = Path(sys.argv[2])
    converted = []
    def convert(target):
        converted.append(True)
        convert_gguf(gguf, "float32", target)
    use = ConvertCache(Path(sys.argv[1])).use(gguf, "float32", convert)
    print(json.dumps({"path": str(use.path), "converted": bool(converted)}))
    """
)


def test_two_processes_share_one_conversion(tmp_path: Path) -> None:
    """Started together on an empty cache: one converts, the other waits for it and reads its folder."""
    root = tmp_path / "cache"
    command = [sys.executable, "-c", CONVERT_IN_A_PROCESS, str(root), str(smollm2_gguf())]
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = [json.loads(process.communicate(timeout=300)[0]) for process in processes]
    assert all(process.returncode == 0 for process in processes)
    assert sorted(r["converted"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]
    (entry,) = ConvertCache(root).entries()
    assert str(entry.path) == results[0]["path"] and not entry.in_use  # both processes have ended
    assert (entry.path / "model.safetensors").is_file() and (entry.path / "tokenizer.json").is_file()
    assert not list(root.glob("*.partial-*"))


def test_the_admin_page_shows_and_clears_a_conversion(tmp_path: Path) -> None:
    """A server with a cache of its own: the first load converts, the second reads the cache; an entry in use
    cannot be cleared, the page's Clear button removes it once the model is unloaded."""
    root = tmp_path / "converted"
    settings = Settings(models=LoadOptions(convert_cache=str(root)))
    registry = ModelRegistry.from_list([bundled_entry(SMOL_HF_GGUF)])
    with RunningServer(registry, settings) as server:
        api = f"{server.base_url}/admin/api"
        loaded_row = httpx.post(f"{api}/models/{SMOL_HF_GGUF}/load", timeout=300).json()
        assert loaded_row["loaded"]["weights_from"].startswith(ORIGIN)
        (entry,) = httpx.get(f"{api}/convert-cache", timeout=30).json()["entries"]
        assert entry["in_use"] and entry["dtype"] == "float32" and entry["gguf"] == str(smollm2_gguf())
        marker = root / entry["key"] / MARKER
        converted_at = marker.stat().st_ino
        refused = httpx.delete(f"{api}/convert-cache/{entry['key']}", timeout=30)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "conversion_in_use"
        page = httpx.get(f"{server.base_url}/admin/", timeout=30).text
        assert "converted from GGUF, cached" in page and "in use by a loaded model" in page

        httpx.post(f"{api}/models/{SMOL_HF_GGUF}/unload", timeout=60)
        again = httpx.post(f"{api}/models/{SMOL_HF_GGUF}/load", timeout=300).json()
        assert again["state"] == "loaded" and marker.stat().st_ino == converted_at  # read, not converted again
        httpx.post(f"{api}/models/{SMOL_HF_GGUF}/unload", timeout=60)

        with httpx.Client(base_url=server.base_url, timeout=30) as browser:
            page = browser.get("/admin/").text
            assert f'action="/admin/convert-cache/{entry["key"]}/clear"' in page
            cleared = browser.post(
                f"/admin/convert-cache/{entry['key']}/clear",
                data={"csrf_token": csrf_token_in(page)},
                headers={"hx-request": "true", "origin": server.base_url},
            )
        assert cleared.status_code == 200 and "nothing converted yet" in cleared.text
        view = httpx.get(f"{api}/convert-cache", timeout=30).json()
        assert view["entries"] == [] and view["size_bytes"] == 0 and not (root / entry["key"]).exists()
        assert httpx.delete(f"{api}/convert-cache/{entry['key']}", timeout=30).status_code == 404


# --- the cache's own bookkeeping -----------------------------------------------------------------------------


def write_files(size: int) -> Any:
    """Not transformers: a converter that writes ``size`` bytes, for what only the cache decides."""

    def convert(target: Path) -> None:
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"\0" * size)

    return convert


def gguf_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(b"GGUF" + name.encode() * 100)
    return path


CRASH_BEFORE_RENAME = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from backends.weights.convert_cache import ConvertCache
    def convert(target):
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"half")
        os.rename = lambda *args: os._exit(3)  # the process dies with the conversion written but not in place
    ConvertCache(Path(sys.argv[1])).use(Path(sys.argv[2]), "float32", convert)
    """
)


def test_a_crash_before_the_rename_leaves_nothing_a_later_load_trusts(tmp_path: Path) -> None:
    root, gguf = tmp_path / "cache", gguf_file(tmp_path, "a")
    crashed = subprocess.run([sys.executable, "-c", CRASH_BEFORE_RENAME, str(root), str(gguf)], cwd=ROOT, check=False)
    assert crashed.returncode == 3
    cache = ConvertCache(root)
    assert cache.entries() == [] and len(list(root.glob("*.partial-*"))) == 1
    use = cache.use(gguf, "float32", write_files(10))  # converted again, the leftover removed
    assert (use.path / MARKER).is_file() and not list(root.glob("*.partial-*"))
    use.release()


def test_the_bound_removes_the_least_recently_used_never_one_in_use(tmp_path: Path) -> None:
    cache = ConvertCache(tmp_path / "cache", max_bytes=2500)
    first = cache.use(gguf_file(tmp_path, "first"), "float32", write_files(1000))  # held: in use
    second = cache.use(gguf_file(tmp_path, "second"), "float32", write_files(1000))
    second.release()
    os.utime(second.path / MARKER, (1, 1))  # used long ago
    third = cache.use(gguf_file(tmp_path, "third"), "float32", write_files(1000))
    third.release()
    kept = {Path(e.gguf).stem for e in cache.entries()}
    assert kept == {"first", "third"}  # "second" was the least recently used free one
    fourth = cache.use(gguf_file(tmp_path, "fourth"), "float32", write_files(1000))
    assert {Path(e.gguf).stem for e in cache.entries()} == {"first", "fourth"}  # "first" is in use: kept
    with pytest.raises(ConversionInUse):
        cache.clear(next(e.key for e in cache.entries() if Path(e.gguf).stem == "first"))
    first.release()
    fourth.release()
    assert all(not e.in_use for e in cache.entries())


def test_the_key_follows_the_file_the_dtype_and_transformers(tmp_path: Path) -> None:
    cache = ConvertCache(tmp_path / "cache")
    gguf = gguf_file(tmp_path, "k")
    key = cache.key(gguf, "float32")
    assert cache.key(gguf, "float32") == key and cache.key(gguf, "bfloat16") != key
    gguf.write_bytes(gguf.read_bytes() + b"changed")
    assert cache.key(gguf, "float32") != key


def test_one_entry_serves_two_models_at_once(tmp_path: Path) -> None:
    """A second model of the same GGUF (another entry, or another server) reads the entry while the first holds
    it, without waiting for it to unload."""
    import threading

    cache = ConvertCache(tmp_path / "cache")
    gguf = gguf_file(tmp_path, "shared")
    first = cache.use(gguf, "float32", write_files(10))
    second: list[Any] = []
    reader = threading.Thread(target=lambda: second.append(cache.use(gguf, "float32", write_files(10))))
    reader.start()
    reader.join(timeout=10)
    assert second and second[0].path == first.path, "the second use waited for the first to end"
    (entry,) = cache.entries()
    assert entry.in_use
    first.release()
    assert cache.entries()[0].in_use  # the second still holds it
    second[0].release()
    assert not cache.entries()[0].in_use
