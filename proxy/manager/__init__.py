"""The model manager: the one owner of every loaded model, in parts a reader can take one at a time.

- ``queue``: admission against a model's bound, the FIFO of requests and their leases;
- ``slot``: one registry name's load state, serialised loads and unloads;
- ``residency``: which models may stay in memory, and which idle one to unload to make room;
- ``manager``: ``ModelManager``, which ties them together behind ``reserve``, ``load`` and ``unload``;
- ``errors``: what it refuses or ends requests with.
"""

from __future__ import annotations

from proxy.manager.errors import (
    ManagerError,
    ModelBusyError,
    ModelNotLoadedError,
    ModelUnloadedError,
    PlacementConflictError,
    RequestTimeoutError,
    ServerShuttingDownError,
)
from proxy.manager.manager import ModelFactory, ModelManager, Reservation
from proxy.manager.queue import Lease, RequestQueue
from proxy.manager.slot import ModelSlot, ModelState

__all__ = [
    "Lease",
    "ManagerError",
    "ModelBusyError",
    "ModelFactory",
    "ModelManager",
    "ModelNotLoadedError",
    "ModelSlot",
    "ModelState",
    "ModelUnloadedError",
    "PlacementConflictError",
    "RequestQueue",
    "RequestTimeoutError",
    "Reservation",
    "ServerShuttingDownError",
]
