"""Transformers checkpoints converted from GGUF files, kept so that a GGUF is dequantised once, not on every load.

transformers reads a GGUF (``gguf_file``) by dequantising every tensor and rebuilding the tokenizer from the
file's metadata; for the 98 MB demo model that takes about 25 s, where the same weights as safetensors load in
about 4. The first load of a GGUF-sourced entry saves what it converted (weights as safetensors, config,
generation config, tokenizer files, chat template) in a folder of this cache, and every later load, in this
process or another, reads that folder like any checkpoint.

- **The key** is the GGUF's identity (size, modification time, a hash of its first MiB: the header and the
  metadata), the transformers version that converted it and the dtype it was saved in.
- **Atomic**: a conversion is written to a temporary folder beside the entry and renamed into place only when
  whole, with a marker file written last; a crash leaves at most a temporary folder, which is never read and is
  removed by the next conversion of that key.
- **Across processes**: each key has a lock file. A conversion holds it exclusively, so a second process waits
  and then reads the first one's result; a model loaded from an entry holds it shared for as long as it stays
  loaded. Clearing or evicting an entry needs the lock exclusively without waiting, so an entry that any
  process is using is never removed.
- **Bounded**: ``max_bytes`` (0: no bound). After a conversion, the least recently used entries that nobody
  uses go until the cache fits; the marker's modification time is when an entry was last used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MARKER = "clemproxy-conversion.json"
PARTIAL = ".partial-"  # a conversion being written: ``<key>.partial-<pid>-<random>``
HEADER_BYTES = 1 << 20
DISABLED = "none"  # --convert-cache none: dequantise the GGUF on every load, keep nothing
ORIGIN = "converted from GGUF, cached"


def default_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("clemproxy", appauthor=False)) / "converted"


def transformers_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("transformers")


def gguf_identity(gguf: Path) -> dict[str, Any]:
    """What tells one GGUF file from another without reading all of it."""
    stat = gguf.stat()
    with open(gguf, "rb") as handle:
        header = hashlib.sha256(handle.read(HEADER_BYTES)).hexdigest()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "header_sha256": header}


@dataclass(frozen=True)
class CachedConversion:
    """One entry of the cache, as the admin page lists it."""

    key: str
    path: Path
    gguf: str
    dtype: str
    transformers: str
    size_bytes: int
    last_used: float
    in_use: bool


class ConversionInUse(Exception):
    """An entry that a loaded model (in this process or another) is reading, or that is being converted."""


class Use:
    """A shared hold on one entry for as long as a model loaded from it stays loaded; ``release()`` ends it."""

    def __init__(self, path: Path, lock: int) -> None:
        self.path = path
        self._lock: int | None = lock

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)  # closing the descriptor drops its lock


class ConvertCache:
    def __init__(self, root: Path, max_bytes: int = 0) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def key(self, gguf: Path, dtype: str) -> str:
        identity = {**gguf_identity(gguf), "transformers": transformers_version(), "dtype": dtype}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
        return f"{gguf.stem[:60]}-{dtype}-{digest}"

    def _lock_path(self, key: str) -> Path:
        return self.root / f"{key}.lock"

    def _open_lock(self, key: str) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT, 0o644)

    def use(self, gguf: Path, dtype: str, convert: Callable[[Path], None]) -> Use:
        """The entry of this GGUF in this dtype, converted first by ``convert(folder)`` unless it exists (or is
        being converted by another process, which is waited for). The returned ``Use`` holds it until released."""
        key = self.key(gguf, dtype)
        entry = self.root / key
        lock = self._open_lock(key)
        try:
            while True:
                # Shared, as every model using the entry holds it; waits only while one converts or removes it.
                fcntl.flock(lock, fcntl.LOCK_SH)
                if (entry / MARKER).is_file():
                    break
                # Exclusive to convert: flock drops the shared lock first, so two processes that both found
                # nothing do not wait for each other; the second finds the first one's conversion.
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (entry / MARKER).is_file():
                    self._convert(gguf, dtype, key, entry, convert)
                fcntl.flock(lock, fcntl.LOCK_UN)  # and look again under the shared lock
            os.utime(entry / MARKER)  # last used: now
        except BaseException:
            os.close(lock)
            raise
        self._evict(keep=key)
        return Use(entry, lock)

    def _convert(self, gguf: Path, dtype: str, key: str, entry: Path, convert: Callable[[Path], None]) -> None:
        for stale in self.root.glob(f"{key}{PARTIAL}*"):  # what a crashed conversion left
            shutil.rmtree(stale, ignore_errors=True)
        if entry.exists():  # not whole (no marker): never trusted
            shutil.rmtree(entry)
        partial = self.root / f"{key}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        logger.info("converting %s (%s) into the cache %s", gguf, dtype, self.root)
        try:
            convert(partial)
            marker = {"gguf": str(gguf), "dtype": dtype, "transformers": transformers_version(), **gguf_identity(gguf)}
            (partial / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
            os.rename(partial, entry)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        logger.info("converted %s in %.1f s (%s)", gguf.name, time.monotonic() - started, _human(_size(entry)))

    # --- what the admin page shows and does ----------------------------------------------------------------

    def entries(self) -> list[CachedConversion]:
        """Every whole entry, the most recently used first."""
        if not self.root.is_dir():
            return []
        found = []
        for marker_path in self.root.glob(f"*/{MARKER}"):
            entry = marker_path.parent
            if PARTIAL in entry.name:  # whole, but never renamed into place: a crash came between
                continue
            try:
                marker = json.loads(marker_path.read_text(encoding="utf-8"))
                last_used = marker_path.stat().st_mtime
            except (OSError, ValueError):
                continue
            found.append(
                CachedConversion(
                    key=entry.name,
                    path=entry,
                    gguf=str(marker.get("gguf", "")),
                    dtype=str(marker.get("dtype", "")),
                    transformers=str(marker.get("transformers", "")),
                    size_bytes=_size(entry),
                    last_used=last_used,
                    in_use=not self._free(entry.name),
                )
            )
        return sorted(found, key=lambda c: c.last_used, reverse=True)

    def size_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self.entries())

    def clear(self, key: str) -> bool:
        """Remove one entry; False if there is none. Raises ``ConversionInUse`` for one a model is using."""
        entry = self.root / key
        if "/" in key or key.startswith(".") or PARTIAL in key or not (entry / MARKER).is_file():
            return False
        with self._exclusive(key) as held:
            if not held:
                raise ConversionInUse(key)
            shutil.rmtree(entry)
        logger.info("removed %s from the conversion cache", key)
        return True

    def _free(self, key: str) -> bool:
        with self._exclusive(key) as held:
            return held

    @contextlib.contextmanager
    def _exclusive(self, key: str) -> Iterator[bool]:
        """The entry's lock taken exclusively without waiting: False while anyone uses or converts it."""
        lock = self._open_lock(key)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(lock)

    def _evict(self, keep: str) -> None:
        """The least recently used entries nobody uses, until the cache fits its bound."""
        if not self.max_bytes:
            return
        entries = self.entries()
        total = sum(entry.size_bytes for entry in entries)
        for entry in reversed(entries):  # the least recently used first
            if total <= self.max_bytes:
                break
            if entry.key == keep:
                continue
            with contextlib.suppress(ConversionInUse):
                if self.clear(entry.key):
                    total -= entry.size_bytes
        if total > self.max_bytes:
            logger.warning(
                "the conversion cache %s holds %s, over its bound of %s: the rest is in use",
                self.root,
                _human(total),
                _human(self.max_bytes),
            )


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _human(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB"


# --- the conversion itself ---------------------------------------------------------------------------------


def convert_gguf(gguf: Path, dtype: str, target: Path) -> None:
    """Dequantise a GGUF with transformers, on the CPU, and save it as a checkpoint folder: the model's
    safetensors and configs, and the tokenizer (with the GGUF's chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype), local_files_only=True
    )
    # The weights are plain tensors once dequantised; only the GGUF "quantizer" left on the model stops
    # save_pretrained, which refuses to save a model it considers quantized.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.mkdir(parents=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
