"""The model manager on its own: admission, order, bounds, holds and eviction, with ``FakeModels`` (a named
fake: models without weights whose generations the test holds and releases). The same rules over a real
server with the real model are in ``test_burst.py`` and ``test_manager.py``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from backends import GenerationOutcome, GenerationParams, LoadOptions, ModelLoadError, ModelRegistry
from proxy.errors import APIError
from proxy.manager import ModelBusyError, ModelManager, ModelState, ServerShuttingDownError
from proxy.settings import ManagerSettings
from tests.support import FakeModels, smol_entry

A, B = "model-a", "model-b"
PARAMS = GenerationParams(max_tokens=3, temperature=0)


def manager_with(fakes: FakeModels, **settings: Any) -> ModelManager:
    # Three models, not variants of one (which would share a load): each entry names a repo of its own.
    registry = ModelRegistry.from_list(
        [smol_entry(name, parallel=p, huggingface_id=f"fake/{name}") for name, p in ((A, 1), (B, 1), ("pair", 2))]
    )
    return ModelManager(registry, LoadOptions(), fakes, ManagerSettings(**settings))


@pytest.fixture
def fakes() -> FakeModels:
    return FakeModels()


async def request(manager: ModelManager, name: str, label: str) -> str:
    """One request as the serving path makes it: reserve, prepare on the held model, take the turn, generate."""
    async with manager.reserve(name) as reservation:
        assert reservation.model is not None
        prompt = await asyncio.to_thread(reservation.model.prepare, [{"role": "user", "content": label}], PARAMS)
        lease = await reservation.turn()
        outcome = GenerationOutcome()
        cancel = lease.cancel_event()
        text = await asyncio.to_thread(lambda: "".join(lease.model.generate(prompt, PARAMS, cancel, outcome)))
        lease.tokens += outcome.completion_tokens
        return text


async def until(condition: Any, what: str) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


@pytest.fixture
async def held(fakes: FakeModels) -> AsyncIterator[FakeModels]:
    """Generations wait until the test opens the gate again."""
    fakes.gate.clear()
    yield fakes
    fakes.gate.set()


async def test_a_burst_admits_concurrency_plus_max_queue(held: FakeModels) -> None:
    manager = manager_with(held, max_queue=2)
    try:
        results = asyncio.gather(*(request(manager, A, f"r{i}") for i in range(12)), return_exceptions=True)
        await until(lambda: manager.slot(A).queue.admitted == 3, "three are admitted")
        await asyncio.sleep(0.05)
        held.gate.set()
        outcomes = await results
        refused = [r for r in outcomes if isinstance(r, ModelBusyError)]
        assert len(refused) == 9 and all(APIError.of(r).headers["Retry-After"] == "2" for r in refused)
        assert [r for r in outcomes if isinstance(r, str)] == ["xxx"] * 3
        assert manager.slot(A).queue.admitted == 0 and held.started == ["r0", "r1", "r2"]
        assert len(held.made) == 1  # one load, however many asked at once
    finally:
        await manager.close()


async def test_the_bound_counts_running_requests_of_a_model_that_runs_two(held: FakeModels) -> None:
    manager = manager_with(held, max_queue=1)
    try:
        results = asyncio.gather(*(request(manager, "pair", f"r{i}") for i in range(6)), return_exceptions=True)
        await until(lambda: len(manager.slot("pair").queue.running) == 2, "two run at once")
        assert manager.slot("pair").queue.queued == 1
        held.gate.set()
        outcomes = await results
        assert (
            sum(isinstance(r, str) for r in outcomes) == 3 and sum(isinstance(r, ModelBusyError) for r in outcomes) == 3
        )
    finally:
        await manager.close()


async def test_turns_are_first_come_first_served(held: FakeModels) -> None:
    manager = manager_with(held, max_queue=8)
    try:
        tasks = []
        for index in range(4):
            tasks.append(asyncio.create_task(request(manager, A, f"r{index}")))
            await until(lambda index=index: manager.slot(A).queue.admitted == index + 1, f"r{index} is admitted")
        held.gate.set()
        await asyncio.gather(*tasks)
        assert held.started == ["r0", "r1", "r2", "r3"]
    finally:
        await manager.close()


async def test_a_request_that_leaves_gives_its_place_back(held: FakeModels) -> None:
    manager = manager_with(held, max_queue=1)
    try:
        running = asyncio.create_task(request(manager, A, "running"))
        await until(lambda: len(manager.slot(A).queue.running) == 1, "one runs")
        waiting = asyncio.create_task(request(manager, A, "waiting"))
        await until(lambda: manager.slot(A).queue.waiting, "one waits")
        with pytest.raises(ModelBusyError):
            await request(manager, A, "refused")
        waiting.cancel()  # its client left
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert manager.slot(A).queue.admitted == 1 and not manager.slot(A).queue.waiting
        after = asyncio.create_task(request(manager, A, "after"))  # the place is free again
        held.gate.set()
        assert await running == "xxx" and await after == "xxx"
    finally:
        await manager.close()


async def test_an_unload_waits_for_a_prompt_being_prepared(fakes: FakeModels) -> None:
    manager = manager_with(fakes)
    try:
        async with manager.reserve(A) as reservation:
            assert manager.slot(A).queue.holds == 1
            unload = asyncio.create_task(manager.unload(A))
            await asyncio.sleep(0.05)
            assert not unload.done() and manager.slot(A).state == ModelState.UNLOADING
            assert reservation.model is not None and reservation.model.is_loaded  # still usable for preparing
        await unload
        assert manager.slot(A).state == ModelState.UNLOADED
    finally:
        await manager.close()


async def test_max_loaded_evicts_the_idle_model_and_waits_for_a_busy_one(held: FakeModels) -> None:
    manager = manager_with(held, max_loaded=1)
    try:
        held.gate.set()
        await request(manager, A, "a")
        await request(manager, B, "b")  # A is idle: unloaded to make room
        assert manager.loaded_names() == [B]
        held.gate.clear()
        busy = asyncio.create_task(request(manager, B, "busy"))
        await until(lambda: manager.slot(B).queue.running, "B serves")
        other = asyncio.create_task(request(manager, A, "a again"))
        await asyncio.sleep(0.1)
        assert not other.done() and manager.loaded_names() == [B]  # never evicts a model that serves
        held.gate.set()
        assert await busy == "xxx" and await other == "xxx"
        assert manager.loaded_names() == [A]
    finally:
        await manager.close()


async def test_a_failed_load_fails_the_requests_waiting_on_it_and_the_next_one_retries() -> None:
    fakes = FakeModels(load_seconds=0.1, failing=frozenset({A}))
    manager = manager_with(fakes)
    try:
        outcomes = await asyncio.gather(*(request(manager, A, f"r{i}") for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, ModelLoadError) for r in outcomes) and len(fakes.made) == 1
        assert manager.slot(A).state == ModelState.FAILED and manager.slot(A).queue.admitted == 0
        with pytest.raises(ModelLoadError):
            await request(manager, A, "again")
        assert len(fakes.made) == 2  # tried again, not a remembered verdict
    finally:
        await manager.close()


async def test_a_draining_manager_refuses_new_and_queued_requests(held: FakeModels) -> None:
    manager = manager_with(held, max_queue=4)
    try:
        running = asyncio.create_task(request(manager, A, "running"))
        await until(lambda: manager.slot(A).queue.running, "one runs")
        queued = asyncio.create_task(request(manager, A, "queued"))
        await until(lambda: manager.slot(A).queue.waiting, "one waits")
        drain = asyncio.create_task(manager.drain(timeout=30))
        with pytest.raises(ServerShuttingDownError):
            await queued
        with pytest.raises(ServerShuttingDownError):
            await request(manager, A, "new")
        held.gate.set()
        assert await running == "xxx"  # the running one finishes
        await drain
    finally:
        await manager.close()
