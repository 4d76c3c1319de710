"""The worker process of one loaded model: ``python -m backends.hosts.worker_main FD [LEVEL]``.

The server's front (``backends.hosts.process``) starts it with one end of a socket pair as FD, sends it the
entry to load, and then its calls; everything that crosses is a pickled list of messages, so that the
messages of every stream decoded in one engine step travel together. Its log goes to stderr, one record a
line (``LEVEL|logger|message``), which the front logs again and keeps the last lines of for when this process
dies. When the front goes away (the socket closes), this process ends.

Messages from the front: ``("load", entry, options)``, ``("cancel_load",)``, ``("prepare", id, messages, text,
params)``, ``("generate", id, prompt, params)``, ``("cancel", id)``, ``("threads", n)``, ``("unload",)``.
To the front: ``("progress", view)``, ``("loaded", describe)``, ``("load_failed", error)``,
``("result", id, answer)``, ``("chunk", id, chunk)``, ``("stats", load_info)``.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from backends.errors import BackendError, ModelLoadError
from backends.hosts.worker import ModelWorker, error_fields
from backends.model import LoadOptions, Model

logger = logging.getLogger("backends.hosts.worker")

PROGRESS_INTERVAL_S = 0.25  # how often a load's progress is sent while it changes
STATS_INTERVAL_S = 0.5  # how often the loaded model's statistics are sent while they change
ENGINE_FAILED_EXIT = 70  # the exit status when the engine thread died of an exception


class WorkerHost:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.model: Model | None = None
        self.worker: ModelWorker | None = None
        self.cancels: dict[int, threading.Event] = {}
        self.prepares = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prepare")
        self.loaded = threading.Event()
        self.writer = threading.Thread(target=self._write, name="writer", daemon=True)
        self.writer.start()

    def send(self, message: tuple[Any, ...]) -> None:
        self.outbox.put(message)

    def _write(self) -> None:
        """One thread sends: whatever is waiting goes as one list, a step's chunks of every stream together."""
        while True:
            batch = [self.outbox.get()]
            while True:
                try:
                    batch.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
            closing = batch[-1] is None
            messages = [m for m in batch if m is not None]
            try:
                if messages:
                    self.connection.send(messages)
            except (OSError, ValueError):
                os._exit(0)  # the front is gone
            if closing:
                return

    def flush_and_exit(self, status: int) -> None:
        self.outbox.put(None)
        self.writer.join(timeout=5)
        logging.shutdown()
        os._exit(status)

    # --- the front's calls ---------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            try:
                message = self.connection.recv()
            except (EOFError, OSError):
                os._exit(0)  # the front is gone: so is this model
            self.dispatch(message)

    def dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "load":
            threading.Thread(target=self._load, args=message[1:], name="load", daemon=True).start()
        elif kind == "cancel_load":
            if self.model is not None:
                self.model.progress.cancel()
        elif kind == "prepare":
            self.prepares.submit(self._prepare, *message[1:])
        elif kind == "generate":
            call_id = message[1]
            self.cancels[call_id] = threading.Event()
            threading.Thread(target=self._generate, args=message[1:], name=f"stream-{call_id}", daemon=True).start()
        elif kind == "cancel":
            cancel = self.cancels.get(message[1])
            if cancel is not None:
                cancel.set()
        elif kind == "threads":
            if self.model is not None and self.loaded.is_set():
                self.model.set_threads(int(message[1]))
        elif kind == "unload":
            self._unload()

    def _load(self, entry: dict[str, Any], options: dict[str, Any]) -> None:
        from backends import ModelSpec, create_model

        try:
            model = self.model = create_model(ModelSpec.from_dict(entry), LoadOptions(**options))
            watcher = threading.Thread(target=self._send_progress, args=(model,), name="progress", daemon=True)
            watcher.start()
            try:
                model.load()
            finally:
                self.send(("progress", model.progress.view()))
        except BackendError as exc:
            self.send(("load_failed", error_fields(exc)))
            self.flush_and_exit(0)
        except Exception as exc:
            logger.exception("the load failed")
            self.send(("load_failed", error_fields(ModelLoadError(f"{type(exc).__name__}: {exc}"))))
            self.flush_and_exit(0)
        self.worker = ModelWorker(model)
        self.loaded.set()
        self.send(("loaded", self.worker.describe()))
        threading.Thread(target=self._send_stats, args=(model,), name="stats", daemon=True).start()

    def _send_progress(self, model: Model) -> None:
        last: dict[str, Any] = {}
        while not self.loaded.wait(PROGRESS_INTERVAL_S):
            view = model.progress.view()
            view.pop("stage_seconds", None)
            if view != last:
                self.send(("progress", model.progress.view()))
                last = view

    def _send_stats(self, model: Model) -> None:
        """The model's statistics while they change; and the end of this process when its engine has died of an
        exception (its requests have had their error; the front then sees a crash, with the traceback)."""
        last: dict[str, Any] = {}
        while model.is_loaded:
            if not model.healthy():
                logger.error("the engine of %s stopped; this worker ends", model.name)
                self.flush_and_exit(ENGINE_FAILED_EXIT)
            info = model.load_info()
            if info != last:
                self.send(("stats", info))
                last = info
            time.sleep(STATS_INTERVAL_S)

    def _prepare(self, call_id: int, messages: Any, text: str | None, params: Any) -> None:
        worker = self.worker
        answer = worker.prepare(messages, text, params) if worker is not None else {"error": _not_loaded()}
        self.send(("result", call_id, answer))

    def _generate(self, call_id: int, prompt: dict[str, Any], params: Any) -> None:
        worker, cancel = self.worker, self.cancels[call_id]
        try:
            if worker is None:
                self.send(("chunk", call_id, {"error": _not_loaded()}))
                return
            for chunk in worker.chunks(prompt, params, cancel):
                if "pieces" not in chunk:  # the last: the statistics it changed arrive before it does
                    self.send(("stats", worker.model.load_info()))
                self.send(("chunk", call_id, chunk))
        finally:
            self.cancels.pop(call_id, None)

    def _unload(self) -> None:
        model, self.model = self.model, None
        self.loaded.clear()
        if model is not None and model.is_loaded:
            for cancel in list(self.cancels.values()):
                cancel.set()
            model.unload()
        self.flush_and_exit(0)


def _not_loaded() -> dict[str, Any]:
    return error_fields(ModelLoadError("the worker has no model loaded"))


class LineFormatter(logging.Formatter):
    """``LEVEL|logger|message``, one line: newlines of a traceback are escaped, the front unescapes them."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\\", "\\\\").replace("\n", "\\n")
        return f"{record.levelname}|{record.name}|{text}"


def main(argv: list[str]) -> None:
    faulthandler.enable()  # a native crash writes the Python stacks to stderr, which the front keeps
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter("%(message)s"))
    level = argv[2] if len(argv) > 2 and argv[2] in logging.getLevelNamesMapping() else "INFO"
    logging.basicConfig(level=level, handlers=[handler], force=True)
    host = WorkerHost(Connection(int(argv[1])))
    host.run()


if __name__ == "__main__":
    main(sys.argv)
