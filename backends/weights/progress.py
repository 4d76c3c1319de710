"""How far a load has got: its stage, and the bytes of a download, for the admin page; and its cancelling.

A load runs on a worker thread; the page reads its ``LoadProgress`` from the event loop. ``huggingface_hub``
reports a download through a tqdm class (``tqdm_class``): ours counts the bytes, and raises ``LoadCancelled``
from inside the download once the load is cancelled, which stops it mid-file; the next load resumes a single
file where it stopped (``backends.weights.fetch_blob``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from backends.errors import ModelLoadError


class LoadCancelled(ModelLoadError):
    """The load was cancelled (the model was unloaded while it loaded); requests that waited for it may retry."""

    status = 503
    error_type = "service_unavailable"
    code = "load_cancelled"


class LoadProgress:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stage = "starting"
        self.stage_since = time.time()
        self.cancelled = threading.Event()
        self._files: dict[int, list[int]] = {}  # one per file being fetched: [bytes done, bytes total]
        self._done_before = 0  # bytes of files fetched to the end
        self._download_started: float | None = None
        self._samples: list[tuple[float, int]] = []  # (time, bytes done), the last few seconds, for the speed

    def enter(self, stage: str) -> None:
        """The load moved on (``downloading``, ``reading weights``, ``dequantising GGUF``...)."""
        self.check()
        with self._lock:
            self.stage, self.stage_since = stage, time.time()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise LoadCancelled("The load was cancelled")

    def cancel(self) -> None:
        self.cancelled.set()

    # --- the download, as huggingface_hub's tqdm reports it ------------------------------------------

    def _file(self, key: int, total: int, initial: int) -> None:
        with self._lock:
            self._files[key] = [initial, total]
            if self._download_started is None:
                self._download_started = time.monotonic()

    def _advance(self, key: int, n: int) -> None:
        with self._lock:
            counts = self._files.get(key)
            if counts is not None:
                counts[0] += n
            now = time.monotonic()
            self._samples.append((now, self._bytes_done()))
            while self._samples and now - self._samples[0][0] > 5:
                self._samples.pop(0)
        self.check()

    def _finish(self, key: int) -> None:
        with self._lock:
            counts = self._files.pop(key, None)
            if counts is not None:
                self._done_before += counts[0]

    def _bytes_done(self) -> int:
        return self._done_before + sum(done for done, _ in self._files.values())

    def tqdm_class(self) -> type[Any]:
        """A tqdm class for ``hf_hub_download(tqdm_class=...)`` that reports to this progress (bytes only)."""
        from tqdm.auto import tqdm

        progress = self

        class Reporter(tqdm):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True  # nothing on the terminal; the admin page shows it
                super().__init__(*args, **kwargs)
                self._counts_bytes = kwargs.get("unit") == "B"
                if self._counts_bytes:
                    progress._file(id(self), int(kwargs.get("total") or 0), int(kwargs.get("initial") or 0))

            def update(self, n: float | None = 1) -> bool | None:
                if self._counts_bytes and n:
                    progress._advance(id(self), int(n))
                return None

            def close(self) -> None:
                if getattr(self, "_counts_bytes", False):
                    progress._finish(id(self))
                    self._counts_bytes = False
                super().close()

        return Reporter

    def view(self) -> dict[str, Any]:
        """The stage, and a ``download`` while one runs: bytes done and total, speed, time left."""
        with self._lock:
            view: dict[str, Any] = {"stage": self.stage, "stage_seconds": round(time.time() - self.stage_since, 1)}
            if self._download_started is None:
                return view
            done = self._bytes_done()
            total = self._done_before + sum(t for _, t in self._files.values())
            speed = 0.0
            if len(self._samples) >= 2:
                (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
                speed = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
            left = (total - done) / speed if speed > 0 and total >= done else None
            view["download"] = {
                "bytes_done": done,
                "bytes_total": total,
                "files_in_progress": len(self._files),
                "bytes_per_second": round(speed),
                "seconds_left": round(left, 1) if left is not None else None,
                "fraction": round(done / total, 4) if total else None,
            }
            return view
