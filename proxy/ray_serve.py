"""Registry models as Ray Serve deployments (``clemproxy serve --ray local|ADDRESS``).

The front door stays this process: its Litestar app, registry, model manager and admin page. With ``--ray``
the manager's models are ``RayServeModel``s: loading one deploys a Serve application of one deployment whose
replicas (``ModelReplica``) load the entry with the backend's own code, on whichever nodes of the cluster have
room; unloading it deletes the application. A request prepares its prompt on a replica and streams its
generation from one, several tokens per chunk (Serve costs a millisecond or two per chunk). The manager stays
the model manager: Serve's multiplexing is not used, because it evicts models that are still streaming.

Ray is optional (``pip install 'clemproxy[ray]'``) and imported only here and in the replica's module
(``backends.hosts.ray_replica``), only when ``--ray`` is given.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import secrets
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backends import (
    GenerationOutcome,
    GenerationParams,
    LoadOptions,
    Model,
    ModelLoadError,
    ModelSpec,
    backend_of,
)
from backends import create_model as create_local_model
from backends.errors import GenerationError
from backends.hosts.ray_replica import ModelReplica, import_ray, import_serve
from backends.hosts.worker import RemoteGeneration, prepared_from, prompt_fields
from backends.model import PreparedPrompt
from backends.placement import requested_gpu_layers
from proxy.manager.errors import ManagerError, ModelBusyError

logger = logging.getLogger(__name__)

APP_PREFIX = "clemproxy-"

# Passed on to every replica, so that the replicas look for weights as this server does (offline, same caches).
FORWARDED_ENVIRONMENT = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_TOKEN", "CLEMPROXY_TEST_CACHE")


class ReplicaUnavailableError(ManagerError):
    """The replica serving a request died or could not be reached; Serve starts a new one."""

    code = "replica_unavailable"


def replicas_of(spec: Mapping[str, Any]) -> int:
    """The most replicas an entry may have: ``replicas``, else ``autoscaling.max``, else 1."""
    autoscaling = spec.get("autoscaling")
    if isinstance(autoscaling, Mapping):
        return int(autoscaling.get("max", 1))
    return int(spec.get("replicas", 1))


async def refresh_replicas(models: Sequence[Model]) -> None:
    """Before a view of the models: every deployed model's replicas as Serve knows them now, asked on threads."""

    deployed = [model for model in models if isinstance(model, RayServeModel) and model.is_loaded]
    await asyncio.gather(*(asyncio.to_thread(model.refresh_replicas) for model in deployed))


# --- this process: the cluster and the models deployed on it ----------------------------------------


@dataclass
class ReplicaCount:
    served: int = 0
    in_flight: int = 0


class RayCluster:
    """This server's Ray cluster: a private local instance (``local``) or an existing one (an address), with
    Serve running without HTTP proxies: the front door is this process."""

    def __init__(self, address: str, deploy_timeout: float = 600.0) -> None:
        self.address = address
        self.deploy_timeout = deploy_timeout
        self.started = False
        self._owned = address == "local"
        # Application names carry this server's own id, so that two servers sharing a cluster never touch
        # each other's deployments, even of models with the same name.
        self.instance = secrets.token_hex(3)
        self._deployed: set[str] = set()

    def start(self) -> None:
        """Connect (blocking: seconds), and start Serve's controller if the cluster has none."""
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray, serve = import_ray(), import_serve()
        if self._owned:
            ray.init(
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                object_store_memory=256 * 1024**2,  # only chunks of text and small dicts travel through it
                log_to_driver=False,
            )
        else:
            ray.init(address=self.address, log_to_driver=False)
        serve.start(proxy_location="Disabled")
        self.started = True
        resources = ray.cluster_resources()
        logger.info(
            "Ray cluster %s: %d nodes, %g CPUs, %g GPUs",
            "started locally" if self._owned else f"at {self.address}",
            len([n for n in ray.nodes() if n.get("Alive")]),
            resources.get("CPU", 0),
            resources.get("GPU", 0),
        )

    def stop(self) -> None:
        """Delete this server's applications; shut a private instance down, leave a shared cluster running."""
        if not self.started:
            return
        ray, serve = import_ray(), import_serve()
        try:
            for name in list(self._deployed):
                self.delete(name)
            if self._owned:
                serve.shutdown()
        finally:
            ray.shutdown()
            self.started = False

    def gpus(self) -> float:
        ray = import_ray()
        return float(ray.cluster_resources().get("GPU", 0))

    def app_name(self, spec: Mapping[str, Any]) -> str:
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(spec["model_name"]))
        return f"{APP_PREFIX}{self.instance}-{name}"

    def deploy(self, spec: ModelSpec, options: LoadOptions) -> Any:
        """Deploy one entry and wait until its replicas run; a handle on it. ``ModelLoadError`` when a replica
        cannot load it, or when the cluster has no room within ``deploy_timeout``."""
        serve = import_serve()
        app = self.app_name(spec)
        entry = {k: v for k, v in spec.items() if k not in ("replicas", "autoscaling")}
        slots = backend_of(spec).concurrency_of(spec, options)
        wants_gpu = requested_gpu_layers(spec, gpu_available=True) != 0
        gpus = 1.0 if wants_gpu and self.gpus() > 0 else 0.0
        if spec.get("execute_on") == "gpu" and gpus == 0:
            raise ModelLoadError(f"'{spec['model_name']}' asks for execute_on: gpu, but the Ray cluster has no GPU")
        environment = {key: os.environ[key] for key in FORWARDED_ENVIRONMENT if key in os.environ}
        deployment_options: dict[str, Any] = {
            "name": "model",
            "max_ongoing_requests": slots,  # a replica decodes its slots' requests together; more wait here
            # num_cpus 0: a replica's threads are the backend's to set (--threads); Ray's CPU count would only
            # keep a second replica off a small machine.
            "ray_actor_options": {"num_cpus": 0, "num_gpus": gpus, "runtime_env": {"env_vars": environment}},
        }
        autoscaling = spec.get("autoscaling")
        if isinstance(autoscaling, Mapping):
            deployment_options["autoscaling_config"] = {
                "min_replicas": int(autoscaling.get("min", 1)),
                "max_replicas": int(autoscaling.get("max", 1)),
                "target_ongoing_requests": slots,
            }
        else:
            deployment_options["num_replicas"] = int(spec.get("replicas", 1))
        deployment = serve.deployment(ModelReplica).options(**deployment_options)
        target = deployment.bind(entry, dataclasses.asdict(options))
        logger.info("%s: deploying %s (%s)", spec["model_name"], app, deployment_options)
        self._deployed.add(app)
        try:
            serve._run(target, name=app, route_prefix=None, _blocking=False)
        except AttributeError:  # a Ray without the non-blocking form: waits for the replicas itself
            serve.run(target, name=app, route_prefix=None)
        self._wait_running(app, str(spec["model_name"]))
        return serve.get_deployment_handle("model", app_name=app)

    def _wait_running(self, app: str, name: str) -> None:
        serve = import_serve()
        deadline = time.monotonic() + self.deploy_timeout
        while True:
            status = serve.status().applications.get(app)
            state = str(status.status.value if status is not None else "NOT_STARTED")
            if state == "RUNNING":
                return
            if state == "DEPLOY_FAILED":
                message = status.message if status is not None else ""
                self.delete(app)
                raise ModelLoadError(f"'{name}' could not be deployed on the Ray cluster: {message}")
            if time.monotonic() > deadline:
                self.delete(app)
                raise ModelLoadError(
                    f"'{name}' was not running on the Ray cluster after {self.deploy_timeout:g} s: no node had room "
                    "for its replicas (GPUs, memory), or a replica took that long to load"
                )
            time.sleep(0.2)

    def delete(self, app: str) -> None:
        import_serve().delete(app)
        self._deployed.discard(app)

    def replicas(self, app: str) -> list[dict[str, Any]]:
        """Each replica of an application: its id, state, node and process, as Serve's controller knows them."""
        from ray.serve import context

        try:
            client: Any = context._get_global_client()
            details = client.get_serve_details()
            replicas = details["applications"][app]["deployments"]["model"]["replicas"]
        except Exception:  # deleted meanwhile, or a Ray whose details look different: no replicas shown
            return []
        return [
            {
                "replica": r.get("replica_id"),
                "state": r.get("state"),
                "node_id": r.get("node_id"),
                "node_ip": r.get("node_ip"),
                "pid": r.get("pid"),
            }
            for r in replicas
        ]

    def model(self, spec: ModelSpec, options: LoadOptions) -> Model:
        """The manager's model factory in ``--ray`` mode: local entries are deployed, remote ones forwarded."""
        if backend_of(spec).remote:
            return create_local_model(spec, options)
        return RayServeModel(spec, options, self)

    @staticmethod
    def concurrency_of(spec: ModelSpec, options: LoadOptions) -> int:
        """Requests at once across an entry's replicas: each replica's own, times the most replicas it may have."""
        one = backend_of(spec).concurrency_of(spec, options)
        return one if backend_of(spec).remote else one * replicas_of(spec)


class RayServeModel(Model):
    """A registry entry deployed on the Ray cluster, as the manager sees it: loading deploys it, unloading
    deletes it, and prompts and generations go to its replicas."""

    backend_name = "ray_serve"
    mandatory_keys = ()

    def __init__(self, spec: ModelSpec, options: LoadOptions, cluster: RayCluster) -> None:
        super().__init__(spec, options)
        self.cluster = cluster
        self.app = cluster.app_name(spec)
        self.handle: Any = None
        self.replica_info: dict[str, Any] = {}
        self.counts: dict[str, ReplicaCount] = collections.defaultdict(ReplicaCount)
        self._counts_lock = threading.Lock()
        self._replicas: list[dict[str, Any]] = []  # as Serve's controller last told, at most a second ago
        self._replicas_at = 0.0
        self._refreshing = threading.Lock()

    def load(self) -> None:
        handle = self.cluster.deploy(self.spec, self.options)
        self.replica_info = handle.describe.remote().result()
        self.context_size = int(self.replica_info["context_size"])
        self.handle = handle
        self._refresh_replicas()

    def refresh_replicas(self) -> None:
        """Ask Serve's controller for the replicas now (blocking: a worker thread's job)."""
        self._refresh_replicas()

    def _refresh_replicas(self) -> None:
        if not self._refreshing.acquire(blocking=False):
            return  # another thread is asking already
        try:
            self._replicas = self.cluster.replicas(self.app) if self.handle is not None else []
            self._replicas_at = time.monotonic()
        finally:
            self._refreshing.release()

    def replicas(self) -> list[dict[str, Any]]:
        """Each replica with what this server sent it; never waits for Ray (the event loop asks): a stale list is
        refreshed on a thread of its own for the next caller."""
        if time.monotonic() - self._replicas_at > 1.0:
            threading.Thread(target=self._refresh_replicas, name=f"ray-replicas-{self.name}", daemon=True).start()
        shown = [dict(r) for r in self._replicas]
        with self._counts_lock:
            for replica in shown:
                count = self.counts.get(replica["replica"], ReplicaCount())
                replica.update(requests_served=count.served, in_flight=count.in_flight)
        return shown

    def unload(self) -> None:
        if self.handle is not None:
            self.handle = None
            self.cluster.delete(self.app)

    @property
    def is_loaded(self) -> bool:
        return self.handle is not None

    def load_info(self) -> dict[str, Any]:
        """A replica's own load info, its model's bytes counted once per replica, and every replica."""
        info = dict(self.replica_info.get("load_info") or {})
        per_replica = int(info.get("model_bytes") or 0) + int(info.get("kv_cache_bytes") or 0)
        wanted = replicas_of(self.spec)
        info.update(
            model_bytes=per_replica * wanted,  # what --max-memory counts: every replica the entry may have
            kv_cache_bytes=0,
            ray={"application": self.app, "replicas": self.replicas(), "replicas_wanted": wanted},
        )
        return info

    def _remote(self, call: Any) -> Any:
        """The answer of a call to a replica; a dead replica or a full queue as the manager's errors."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            return call()
        except BackPressureError:
            raise ModelBusyError(f"Every replica of '{self.name}' is busy; retry later", retry_after=2) from None
        except (RayActorError, DeploymentUnavailableError) as exc:
            raise ReplicaUnavailableError(
                f"The replica serving '{self.name}' died or is unreachable ({type(exc).__name__}); Ray Serve is "
                "starting a new one, retry shortly",
                retry_after=5,
            ) from None

    def prepare(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams) -> PreparedPrompt:
        messages = [dict(m) for m in messages]
        return prepared_from(self._remote(lambda: self.handle.prepare.remote(messages, None, params).result()))

    def prepare_text(self, text: str, params: GenerationParams) -> PreparedPrompt:
        return prepared_from(self._remote(lambda: self.handle.prepare.remote(None, text, params).result()))

    def generate_tokens(
        self, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event, outcome: GenerationOutcome
    ) -> Generator[str, None, None]:
        """The replica's raw pieces (cleaned by ``Model.generate`` here); cancelling stops the replica's
        generation within a chunk."""
        from ray.serve.exceptions import RequestCancelledError

        outcome.finish_reason = "length"
        if prompt.max_tokens <= 0:
            return
        stream = self._remote(lambda: self.handle.options(stream=True).generate.remote(prompt_fields(prompt), params))
        finished = threading.Event()

        def cancel_when_asked() -> None:
            while not finished.is_set():
                if cancel.wait(0.05):
                    stream.cancel()
                    return

        threading.Thread(target=cancel_when_asked, name=f"ray-cancel-{self.name}", daemon=True).start()
        replica: str | None = None
        remote = RemoteGeneration(outcome)
        chunks = iter(stream)
        try:
            while not remote.ended:
                try:
                    chunk = self._remote(lambda: next(chunks))
                except StopIteration:
                    break
                except RequestCancelledError:
                    return
                if "replica" in chunk:
                    replica = chunk["replica"]
                    with self._counts_lock:
                        self.counts[replica].in_flight += 1
                    continue
                yield from remote.pieces(chunk)
                if cancel.is_set():
                    return
        finally:
            finished.set()
            if replica is not None:
                with self._counts_lock:
                    self.counts[replica].in_flight -= 1
                    self.counts[replica].served += 1

    def tokenize_prompt(self, text: str) -> list[int]:
        raise GenerationError(f"{self.name} is tokenised by its replicas")
