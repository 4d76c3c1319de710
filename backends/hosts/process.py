"""Each loaded local model in a worker process of its own, so that a native crash ends that model, not the server.

``WorkerProcesses`` is the model manager's factory: a ``llamacpp`` or ``huggingface_local`` entry becomes a
``WorkerProcessModel``, the front's stand-in for the model. Loading it starts ``python -m
backends.hosts.worker_main`` and has it load the entry; prompts are prepared and generations decoded there
(``backends.hosts.worker``), and the front cleans the text as for any model. Ollama (a runner per model),
llama-swap and LocalAI keep the same split.

When a worker dies (a signal, ``abort()``, the OOM killer, its engine's exception), every call waiting on it
ends at once with ``WorkerCrashedError``, naming the signal and the last lines the worker wrote, and the
manager hears of it through ``on_failure``. Unloading ends the process (asked, then SIGTERM, then SIGKILL), so
its memory really comes back. The CPU threads of every worker come out of one budget (``--threads``): the
models generating share it, so that two models never ask for more busy threads than there are cores.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from backends.errors import GenerationError, ModelLoadError
from backends.hosts.worker import RemoteBackendError, RemoteGeneration, prepared_from, prompt_fields
from backends.model import GenerationOutcome, GenerationParams, LoadOptions, Model, PreparedPrompt
from backends.spec import ModelSpec
from backends.weights.progress import LoadProgress

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # where the worker imports ``backends`` from
STDERR_LINES = 20  # of a worker's output (warnings, errors and lines of its own), kept for when it dies
LAST_WORDS = 5  # of those, in the message of its death
GRACEFUL_S = 5.0  # how long an unload waits for the worker to end by itself before SIGTERM
POLL_S = 0.05  # how often a generation waiting for its next chunk looks at its cancel flag
LOG_LEVELS = {name: getattr(logging, name) for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")}
# Progress bars (transformers' loading, huggingface_hub's downloads) would only fill the log: the admin page
# shows a load's progress. OpenMP's wait policy is left to libgomp (it spins a while, then sleeps): PASSIVE made
# llama.cpp's steps three times slower on a quiet machine (README, "CPU threads").
WORKER_ENVIRONMENT = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
WATCH_INTERVAL_S = 1.0  # how often the CPU time other programs take is looked at


class WorkerCrashedError(GenerationError):
    """The worker process serving the model died; the message names the signal and its last output."""

    status = 502
    error_type = "server_error"
    code = "model_crashed"


class WorkerLoadCrashedError(ModelLoadError):
    """The worker process died while it loaded the model."""

    status = 502
    code = "model_crashed"


def exit_description(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory (Linux), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def thread_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def child_environment() -> dict[str, str]:
    """This process's environment, with the project importable wherever the child starts."""
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def gpus_in_a_process(timeout: float = 120.0) -> dict[str, Any]:
    """``backends.catalog.gpu_summary()`` asked in a child process: the server's front never imports torch or
    llama.cpp (hundreds of MiB it would keep), and a GPU driver that crashes ends the child, not the server."""
    script = "import json; from backends.catalog import gpu_summary; print(json.dumps(gpu_summary()))"
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=child_environment()
        )
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        logger.warning("could not ask the backends about GPUs: %s", exc)
        return {"backends": {}, "names": [], "present": False}


class RemoteProgress(LoadProgress):
    """The front's copy of a worker's load progress; cancelling it asks the worker to cancel its load."""

    def __init__(self, owner: WorkerProcessModel) -> None:
        super().__init__()
        self._owner = owner
        self._view: dict[str, Any] = {"stage": "starting a worker process"}
        self.stage = "starting a worker process"

    def update(self, view: dict[str, Any]) -> None:
        self._view = view
        self.stage = str(view.get("stage", self.stage))

    def view(self) -> dict[str, Any]:
        return dict(self._view)

    def cancel(self) -> None:
        super().cancel()
        self._owner._send_quietly(("cancel_load",))


def _cpu_ticks() -> int | None:
    """Busy CPU time of the whole machine, in clock ticks (Linux's /proc/stat), or None where it cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def _process_ticks(pid: int) -> int:
    """CPU time a process has used (all its threads), in clock ticks; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return 0


class ForeignLoad:
    """How many cores other programs keep busy: the machine's busy time over an interval, less what this server
    and its workers used in it. A thread that waits for a core another program holds stalls every thread of
    its pool at each barrier (llama.cpp's OpenMP pool slows to a fraction of one thread's speed), so the thread
    budget leaves those cores out."""

    def __init__(self) -> None:
        self._last: tuple[float, int, dict[int, int]] | None = None

    def sample(self, pids: list[int]) -> float | None:
        """Cores busy with other programs since the last sample (None the first time, or off Linux)."""
        machine = _cpu_ticks()
        if machine is None:
            return None
        now = time.monotonic()
        ours = {pid: _process_ticks(pid) for pid in pids}
        last, self._last = self._last, (now, machine, ours)
        if last is None or now <= last[0]:
            return None
        before_time, before_machine, before_ours = last
        used_by_us = sum(ticks - before_ours.get(pid, ticks) for pid, ticks in ours.items())
        ticks_per_second = os.sysconf("SC_CLK_TCK")
        return max(machine - before_machine - used_by_us, 0) / ticks_per_second / (now - before_time)


class WorkerProcesses:
    """The manager's model factory when every local model runs in its own process; and the CPU thread budget
    those processes share: ``--threads`` (every core by default), less the cores other programs keep busy."""

    def __init__(self, threads: int = 0, unload_timeout: float = 30.0, follow_load: bool = True) -> None:
        self.configured = threads if threads > 0 else os.cpu_count() or 1
        self.follow_load = follow_load  # leave out the cores other programs keep busy
        self.budget = self.configured
        self.unload_timeout = unload_timeout
        self._models: set[WorkerProcessModel] = set()
        self._lock = threading.Lock()
        self._watching = False

    def free_cores(self, foreign: float) -> int:
        """The budget while other programs keep ``foreign`` cores busy: a core counts as theirs once they use
        40 % of it (a program sharing a core with one of our threads gets only about half of it), and at least one
        is always ours."""
        cores = os.cpu_count() or 1
        taken = int(foreign + 0.6)
        return max(min(self.configured, cores - taken), 1)

    def _watch(self) -> None:
        """Background thread, while workers run: follow the cores other programs leave free."""
        load = ForeignLoad()
        while True:
            with self._lock:
                pids = [m.pid for m in self._models if m.pid is not None]
                if not pids:
                    self._watching = False
                    self.budget = self.configured
                    return
            foreign = load.sample([os.getpid(), *pids])
            if foreign is not None:
                budget = self.free_cores(foreign)
                if budget != self.budget:
                    logger.info("CPU threads for the models: %d (other programs keep %.1f cores busy)", budget, foreign)
                    self.budget = budget
                    self.rebalance()
            time.sleep(WATCH_INTERVAL_S)

    def model(self, spec: ModelSpec, options: LoadOptions) -> Model:
        from backends import backend_of, create_model

        if backend_of(spec).remote:
            return create_model(spec, options)
        return WorkerProcessModel(spec, options, self)

    # --- the thread budget ---------------------------------------------------------------------------

    def shares(self) -> dict[WorkerProcessModel, int]:
        """Each running worker's threads: an entry's own ``threads``, else an even share of the budget among the
        models generating now; a model that is idle gets the share it would have if it started generating."""
        with self._lock:
            models = list(self._models)
        fixed = {m: int(m.spec["threads"]) for m in models if m.spec.get("threads")}
        busy_fixed = sum(n for m, n in fixed.items() if m.active)
        flexible = [m for m in models if m not in fixed]
        busy = sum(1 for m in flexible if m.active)
        room = max(self.budget - busy_fixed, 1)
        shares = dict(fixed)
        for model in flexible:
            shares[model] = max(room // max(busy + (0 if model.active else 1), 1), 1)
        return shares

    def share_for_new(self, model: WorkerProcessModel) -> int:
        if model.spec.get("threads"):
            return int(model.spec["threads"])
        with self._lock:
            busy = sum(1 for m in self._models if m.active and not m.spec.get("threads"))
        return max(self.budget // (busy + 1), 1)

    def rebalance(self) -> None:
        for model, share in self.shares().items():
            model.use_threads(share)

    def joined(self, model: WorkerProcessModel) -> None:
        with self._lock:
            self._models.add(model)
            start = self.follow_load and not self._watching
            self._watching = self._watching or start
        if start:
            threading.Thread(target=self._watch, name="cpu-watch", daemon=True).start()
        self.rebalance()

    def left(self, model: WorkerProcessModel) -> None:
        with self._lock:
            self._models.discard(model)
        self.rebalance()


class _Call:
    """One call's answers from the worker, in order; a death ends it with the worker's last words."""

    def __init__(self) -> None:
        self.replies: queue.SimpleQueue[Any] = queue.SimpleQueue()


class WorkerProcessModel(Model):
    """A registry entry's model loaded in a worker process, as the manager and the serving path see it."""

    backend_name = "worker_process"
    mandatory_keys = ()
    progress: RemoteProgress

    def __init__(self, spec: ModelSpec, options: LoadOptions, pool: WorkerProcesses) -> None:
        super().__init__(spec, options)
        self.pool = pool
        self.progress = RemoteProgress(self)
        self.active = 0  # generations running now: the thread budget goes to the models that generate
        self.threads = 0  # what the worker was last told to use
        self.death: str | None = None  # why the worker is gone, once it is
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None
        self._send_lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._control: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._output: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._reader: threading.Thread | None = None
        self._output_reader: threading.Thread | None = None
        self._info: dict[str, Any] = {}
        self._loaded = False
        self._unloading = False
        self._started_at = 0.0
        self._active_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # --- the process ---------------------------------------------------------------------------------

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        environment = {**WORKER_ENVIRONMENT, **child_environment()}
        try:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "backends.hosts.worker_main",
                    str(theirs.fileno()),
                    logging.getLevelName(logging.getLogger().getEffectiveLevel()),  # it logs what this one would
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,  # a Ctrl-C at the server's terminal is the server's to handle, not the model's
            )
        except OSError as exc:
            ours.close()
            raise ModelLoadError(f"could not start a worker process for '{self.name}': {exc}") from exc
        finally:
            theirs.close()
        self._started_at = time.time()
        self._connection = Connection(ours.detach())
        self._output_reader = threading.Thread(target=self._read_output, name=f"worker-output-{self.name}", daemon=True)
        self._output_reader.start()
        self._reader = threading.Thread(target=self._read, name=f"worker-{self.name}", daemon=True)
        self._reader.start()
        logger.info("%s: worker process %d started", self.name, self._process.pid)

    def _send(self, message: tuple[Any, ...]) -> None:
        connection = self._connection
        if connection is None or self.death is not None:
            raise WorkerCrashedError(self.death or f"The worker process of '{self.name}' is not running")
        try:
            with self._send_lock:
                connection.send(message)
        except (OSError, ValueError) as exc:
            raise WorkerCrashedError(self.death or f"The worker process of '{self.name}' is gone: {exc}") from None

    def _send_quietly(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(WorkerCrashedError):
            self._send(message)

    def _read_output(self) -> None:
        """The worker's stderr and stdout: its log records logged here again, any other line (llama.cpp's
        own, a fatal error's) as a warning; the last lines kept for the message when it dies."""
        process = self._process
        assert process is not None and process.stdout is not None
        worker_log = logging.getLogger(f"{__name__}.worker")
        for raw in process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            level_name, _, rest = line.partition("|")
            if level_name in LOG_LEVELS and "|" in rest:
                name, _, text = rest.partition("|")
                text = text.replace("\\n", "\n").replace("\\\\", "\\")
                logging.getLogger(name).log(LOG_LEVELS[level_name], "[worker %d] %s", process.pid, text)
                if LOG_LEVELS[level_name] >= logging.WARNING:
                    self._output.append(text.splitlines()[-1] if text else text)
            elif line.strip():
                worker_log.warning("%s [worker %d] %s", self.name, process.pid, line)
                self._output.append(line)

    def _read(self) -> None:
        connection = self._connection
        assert connection is not None
        while True:
            try:
                batch = connection.recv()
            except (EOFError, OSError):
                break
            for message in batch:
                self._dispatch(message)
        self._died()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind in ("chunk", "result"):
            call = self._calls.get(message[1])
            if call is not None:
                call.replies.put(message[2])
        elif kind == "stats":
            self._info = message[1]
        elif kind == "progress":
            self.progress.update(message[1])
        else:  # loaded, load_failed
            self._control.put(message)

    def _died(self) -> None:
        process = self._process
        assert process is not None
        try:
            returncode: int | None = process.wait(timeout=2)
        except subprocess.TimeoutExpired:  # the socket closed, the process lives on: it is ended here
            process.kill()
            returncode = process.wait()
        if self._output_reader is not None:
            self._output_reader.join(timeout=1)  # its last lines, which usually say why
        if self._unloading and returncode == 0:
            self.death = f"The model '{self.name}' was unloaded"
        else:
            last = " | ".join(list(self._output)[-LAST_WORDS:])
            self.death = f"The worker process of '{self.name}' (pid {process.pid}) {exit_description(returncode)}" + (
                f"; its last output: {last}" if last else ""
            )
            logger.error("%s", self.death)
        for call in list(self._calls.values()):
            call.replies.put({"died": self.death})
        self._control.put(("died", self.death))
        was_serving = self._loaded and not self._unloading
        self._loaded = False
        self.pool.left(self)
        if was_serving and self.on_failure is not None:
            self.on_failure(self.death)

    # --- the model -----------------------------------------------------------------------------------

    def load(self) -> None:
        self._start()
        threads = self.pool.share_for_new(self)
        self.threads = threads
        options = asdict(replace(self.options, threads=threads))
        with contextlib.suppress(WorkerCrashedError):  # the answer below says why
            self._send(("load", self.spec.to_dict(), options))
        kind, *rest = self._control.get()
        if kind == "loaded":
            describe = rest[0]
            self.context_size = int(describe["context_size"])
            self._info = describe["load_info"]
            self._loaded = True
            self.pool.joined(self)
            logger.info("%s: loaded in worker process %s", self.name, self.pid)
            return
        self._reap()
        if kind == "load_failed":
            raise RemoteBackendError(rest[0])
        raise WorkerLoadCrashedError(str(rest[0]))

    @property
    def is_loaded(self) -> bool:
        return self._loaded and self.death is None

    def healthy(self) -> bool:
        return self.death is None

    def use_threads(self, threads: int) -> None:
        if threads != self.threads and self.is_loaded:
            self.threads = threads
            self._send_quietly(("threads", threads))

    def unload(self) -> None:
        """Ask the worker to unload and end; SIGTERM after ``GRACEFUL_S``, SIGKILL after the unload timeout."""
        self._unloading = True
        self._loaded = False
        self._send_quietly(("unload",))
        self._reap()
        self.chat_template = None

    def _reap(self) -> None:
        process = self._process
        if process is None:
            return
        for stop, wait in ((None, GRACEFUL_S), (process.terminate, self.pool.unload_timeout), (process.kill, None)):
            if stop is not None:
                logger.warning("%s: worker process %d did not end; %s", self.name, process.pid, stop.__name__)
                stop()
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._connection is not None:
            self._connection.close()
        self.pool.left(self)

    def load_info(self) -> dict[str, Any]:
        """The worker's own load info (sent as it changes), and the process: PID, resident memory, uptime."""
        info = dict(self._info)
        pid = self.pid
        if pid is not None and self.death is None:
            info["worker"] = {
                "pid": pid,
                "resident_bytes": resident_bytes(pid),
                "uptime_s": round(time.time() - self._started_at, 1),
                "threads": self.threads,
                "os_threads": thread_count(pid),
            }
        return info

    # --- calls ---------------------------------------------------------------------------------------

    def _open(self) -> tuple[int, _Call]:
        call_id, call = next(self._ids), _Call()
        self._calls[call_id] = call
        if self.death is not None:
            call.replies.put({"died": self.death})
        return call_id, call

    def _prepare(self, messages: Sequence[Mapping[str, Any]] | None, text: str | None, params: GenerationParams) -> Any:
        call_id, call = self._open()
        try:
            self._send(("prepare", call_id, messages, text, params))
            answer = call.replies.get()
        finally:
            self._calls.pop(call_id, None)
        if "died" in answer:
            raise WorkerCrashedError(answer["died"])
        return prepared_from(answer)

    def prepare(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams) -> PreparedPrompt:
        return self._prepare([dict(m) for m in messages], None, params)  # type: ignore[no-any-return]

    def prepare_text(self, text: str, params: GenerationParams) -> PreparedPrompt:
        return self._prepare(None, text, params)  # type: ignore[no-any-return]

    def tokenize_prompt(self, text: str) -> list[int]:
        return list(self.prepare_text(text, GenerationParams(max_tokens=0)).token_ids)

    def render_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] = (),
        entry: Mapping[str, Any] | None = None,
    ) -> str:
        """The worker's rendering of the messages (it holds the chat template)."""
        params = GenerationParams(
            max_tokens=0, template_kwargs=dict(template_kwargs or {}), tools=tuple(tools), entry=dict(entry or {})
        )
        return self.prepare(messages, params).text

    def generate_tokens(
        self, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event, outcome: GenerationOutcome
    ) -> Generator[str, None, None]:
        outcome.finish_reason = "length"
        if prompt.max_tokens <= 0:
            return
        call_id, call = self._open()
        remote = RemoteGeneration(outcome)
        self._set_active(+1)
        try:
            self._send(("generate", call_id, prompt_fields(prompt), params))
            while not remote.ended:
                try:
                    chunk = call.replies.get(timeout=POLL_S)
                except queue.Empty:
                    if cancel.is_set():
                        return
                    continue
                if "died" in chunk:
                    raise WorkerCrashedError(chunk["died"])
                yield from remote.pieces(chunk)
                if cancel.is_set():
                    return
        finally:
            if not remote.ended:
                self._send_quietly(("cancel", call_id))
            self._calls.pop(call_id, None)
            self._set_active(-1)

    def _set_active(self, change: int) -> None:
        with self._active_lock:
            before = self.active
            self.active += change
            now = self.active
        if (before == 0) != (now == 0):
            self.pool.rebalance()
