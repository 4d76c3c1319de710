"""The Ray Serve host of the worker code: one replica of one registry entry (``clemproxy serve --ray``).

``proxy.ray_serve`` deploys it and is its front, as ``backends.hosts.process`` is the local worker process's.
Ray is optional (``pip install 'clemproxy[ray]'``) and imported only when this runs.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from backends import GenerationParams, LoadOptions, ModelSpec, create_model
from backends.hosts.worker import ModelWorker

CHUNK_TOKENS = 8  # deltas per streamed chunk at most; the first goes alone, so the time to first token stays low
CHUNK_SECONDS = 0.05  # and no delta waits longer than this for the others of its chunk


def import_ray() -> Any:
    """Ray, untyped: only the Ray modules use it, and its own hints are partial."""
    try:
        import ray
    except ImportError:
        raise SystemExit(
            "--ray needs Ray Serve, which is not installed: pip install 'clemproxy[ray]' (on every node)"
        ) from None
    return ray


def import_serve() -> Any:
    import_ray()
    from ray import serve

    return serve


class ModelReplica:
    """One replica of one registry entry: the worker code (``backends.hosts.worker``) in a Ray worker process,
    the other host of it beside the local worker process."""

    def __init__(self, entry: Mapping[str, Any], options: Mapping[str, Any]) -> None:
        ray, serve = import_ray(), import_serve()
        model = create_model(ModelSpec.from_dict(entry), LoadOptions(**options))
        model.load()
        self.worker = ModelWorker(model)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.node_id = ray.get_runtime_context().get_node_id()

    def describe(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "node": self.node_id, "pid": os.getpid(), **self.worker.describe()}

    def prepare(self, messages: Sequence[Mapping[str, Any]] | None, text: str | None, params: GenerationParams) -> Any:
        return self.worker.prepare(messages, text, params)

    async def generate(
        self, prompt: Mapping[str, Any], params: GenerationParams
    ) -> AsyncGenerator[dict[str, Any], None]:
        """First who serves it, then the worker's chunks of raw pieces, up to ``CHUNK_TOKENS`` each. Serve cancels
        this when the caller goes away, which stops the model."""
        yield {"replica": self.replica_id, "node": self.node_id}
        cancel = threading.Event()
        chunks = self.worker.chunks(prompt, params, cancel, most=CHUNK_TOKENS, linger=CHUNK_SECONDS)
        try:
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield chunk
        finally:
            cancel.set()

    def __del__(self) -> None:  # Serve's way to end a replica; it may call this more than once
        worker = getattr(self, "worker", None)
        if worker is not None and worker.model.is_loaded:
            worker.model.unload()
