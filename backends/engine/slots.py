"""What a batching engine keeps per request and per slot, and how it picks a slot; shared by the llama.cpp and
transformers engines.

A slot is one sequence of an engine's KV cache. It keeps the tokens of its last request after that request
ends, so that the dialogue's next turn (which resends the whole history) computes only what is new. Nothing
here touches a cache: ``choose_slot`` is plain bookkeeping over the tokens each slot holds.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from backends.errors import GenerationError
from backends.model import GenerationParams, TokenLogprob
from backends.text.grammar import SequenceMatcher

UNLOADED = "The model was unloaded while this request was generating"


@dataclass(frozen=True)
class EngineEvent:
    """One generated token (``token``, with ``logprob`` when asked for), or the end of the request."""

    token: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop", "length" or "cancelled", on the last event
    error: GenerationError | None = None  # why the request could not go on, on the last event


@dataclass
class EngineRequest:
    """What a request asks of an engine, and the queue its tokens come back on."""

    prompt: tuple[int, ...]
    max_tokens: int
    params: GenerationParams
    cancel: threading.Event = field(default_factory=threading.Event)  # the caller's: client gone, unload, timeout
    abandoned: threading.Event = field(default_factory=threading.Event)  # the reader stopped reading
    events: queue.SimpleQueue[EngineEvent] = field(default_factory=queue.SimpleQueue)
    cached_tokens: int = 0  # of the prompt, found in the cache instead of computed; set when it gets a slot
    constraint: SequenceMatcher | None = None  # this sequence's grammar state, when its output is constrained

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set() or self.abandoned.is_set()

    def grammar_ended(self, token: int) -> bool:
        """Feed a sampled token (not the end of sequence) to the grammar; True when the grammar is complete and
        allows nothing more, so the request ends there, as at the end of sequence."""
        if self.constraint is None:
            return False
        self.constraint.accept(token)
        return self.constraint.ended


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose keys and values are in the cache, in order
    request: EngineRequest | None = None
    sampler: Any = None  # the engine's per-request sampling state
    prompt_length: int = 0  # of the last request: a prompt that covers it continues that request's dialogue
    fed: int = 0  # prompt tokens in the cache so far; all but the last are fed in chunks
    next_token: int | None = None  # to decode with its logits: the prompt's last token, then each sampled one
    generated: int = 0
    output: int = -1  # index in the current batch whose logits this slot samples from
    last_used: float = 0.0
    assigned_at: float = 0.0

    @property
    def busy(self) -> bool:
        return self.request is not None


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two lists share; slices compare in C, so a bisection beats a Python loop."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n - 1  # a[:low] == b[:low], a[:high + 1] != b[:high + 1]
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


class EngineStats:
    """Counters for operators (``load_info``), written by the engine thread, read by anyone."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.requests = 0
        self.kv_full_events = 0


def choose_slot(idle: list[Slot], slots: list[Slot], prompt: list[int]) -> tuple[Slot, int, Slot | None, int]:
    """``(slot, own, donor, shared)``: the idle slot a prompt goes to and the prefix it holds of it, and the
    slot holding the longest prefix of it (any slot, busy or not) with that prefix's length.

    The slot loses the least of what the cache holds: the one whose dialogue the prompt continues (the prompt
    covers that slot's last prompt; the answer after it may be tokenised anew), else an empty one, else the
    least recently used one.
    """
    own = {id(s): common_prefix(s.cached, prompt) for s in idle}
    continuing = [s for s in idle if s.cached and own[id(s)] >= s.prompt_length]
    if continuing:
        slot = max(continuing, key=lambda s: own[id(s)])
    else:
        slot = min(idle, key=lambda s: (bool(s.cached), s.last_used))
    others = [(s, common_prefix(s.cached, prompt)) for s in slots if s is not slot]
    donor, shared = max(others, key=lambda pair: pair[1], default=(None, 0))
    return slot, own[id(slot)], donor, shared
