"""The transformers engine: one thread owns a causal LM and decodes every active request together, a step at a time.

transformers' own continuous batching (``init_continuous_batching``) fixes the sampling settings when its manager
is made, has no per-request seed, penalties or stop strings, and its logits processors do not know which request
a row is; so this is our own loop over the model's forward pass, as the llama.cpp engine is over
``llama_decode``, and every request keeps its own temperature, top_p, seed, penalties and logprobs.

The KV cache (``SlotCache``) holds ``slots`` sequences, one row each, in tensors of
``[slots, kv_heads, capacity, head_dim]`` per layer that grow with the longest sequence. A step decodes one token
for every generating slot in one forward pass over the rows from the lowest to the highest of them (a view of the
cache, not a copy: a row between them that is idle comes along, masked, and is not written), and feeds one chunk
of a pending prompt in a pass of its own. A slot keeps the tokens of its last request; a new request goes to the
slot that would lose the least of them, and the longest prefix any slot holds is copied into it first (a tensor
copy per layer), so a dialogue computes only its new turn and the instances of one game compute their rules once.

Only models whose every layer attends to the whole context can be batched this way (the mask we pass is one for
all layers); others, sliding-window ones among them, are served one request at a time by the backend itself
(``batching_unsupported``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import Cache

from backends.engine.loop import SlotEngine
from backends.engine.slots import EngineEvent, EngineRequest, Slot, choose_slot
from backends.errors import GenerationError
from backends.model import GenerationParams, token_logprob

logger = logging.getLogger(__name__)

T = TypeVar("T")
PREFILL_CHUNK = 256  # prompt tokens per forward pass: a long prompt holds the other streams up for one chunk
CAPACITY_STEP = 256  # the cache grows in whole steps of this many tokens


def batching_unsupported(config: Any) -> str | None:
    """Why this model cannot be batched by the engine, or None: every layer must attend to the whole context."""
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return f"its layers are not all full attention ({sorted(set(layer_types))})"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"it attends through a sliding window of {config.sliding_window} tokens"
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    return None


def on_a_thread_that_ends(work: Callable[[], T]) -> T:
    """``work()`` on a thread of its own that ends with it: torch work done at load time leaves no OpenMP pool
    behind on the caller's thread.

    libgomp keeps a pool of worker threads for every thread that ever ran a parallel region, for as long as that
    thread lives. Once its threads outnumber the cores, every worker stops spinning between parallel regions and
    sleeps at once, and each of the hundreds of regions of a decode step pays a wake-up: one pool left on the
    loading thread made the engine's steps about a third slower on two cores (bfloat16, one stream).
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # handed to the caller, whatever it is
            failure.append(exc)

    thread = threading.Thread(target=run, name="transformers-load")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def penalised(logits: torch.Tensor, counts: Mapping[int, int], params: GenerationParams) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens generated so far."""
    if not counts or (params.presence_penalty == 0 and params.frequency_penalty == 0):
        return logits
    ids = torch.tensor(list(counts), device=logits.device)
    occurrences = torch.tensor(list(counts.values()), device=logits.device, dtype=logits.dtype)
    logits = logits.clone()
    logits[ids] -= params.frequency_penalty * occurrences + params.presence_penalty
    return logits


def next_token(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise sampling with temperature and nucleus (top_p), as OpenAI defines."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (always at least the most likely one).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TorchSampler:
    """One request's sampling state: its own seeded generator, and the counts its penalties need."""

    def __init__(self, params: GenerationParams, device: torch.device | str) -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else random.randrange(2**63))
        self.counts: dict[int, int] = {}

    def sample(self, raw_logits: torch.Tensor) -> int:
        """The next token from one position's raw float logits."""
        token = next_token(penalised(raw_logits, self.counts, self.params), self.params, self.generator)
        self.counts[token] = self.counts.get(token, 0) + 1
        return token


@dataclass
class CacheWrite:
    """Where the forward pass about to run writes its keys and values, and what it attends over.

    A decode writes one token for each of ``slots`` (rows ``rows`` of the batch, at ``positions``) and attends
    over cache rows ``first:last`` up to ``length``; a prefill writes ``count`` tokens of slot ``first`` from
    ``start``.
    """

    first: int
    last: int
    length: int
    rows: torch.Tensor | None = None  # decode: the batch rows that are real slots
    slots: torch.Tensor | None = None  # decode: their slot indices
    positions: torch.Tensor | None = None  # decode: where each one's token goes
    single: tuple[int, int, int] | None = None  # decode of one slot: (row, slot, position)
    start: int = 0  # prefill


class SlotCache(Cache):
    """``slots`` sequences of keys and values, one cache row each, written where the engine says (``plan``)."""

    def __init__(self, slots: int, limit: int) -> None:
        super().__init__(layers=[])
        self.slots = slots
        self.limit = limit  # no sequence is longer than the context window
        self.capacity = 0
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.plan: CacheWrite | None = None

    def reserve(self, length: int) -> None:
        """Room for ``length`` tokens in every row, from the next forward pass on."""
        if length > self.capacity:
            wanted = max(length, 2 * self.capacity)
            self.capacity = min(self.limit, -(-wanted // CAPACITY_STEP) * CAPACITY_STEP)

    @property
    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def _grown(self, held: torch.Tensor | None, states: torch.Tensor) -> torch.Tensor:
        if held is not None and held.shape[2] >= self.capacity:
            return held
        grown = states.new_zeros((self.slots, states.shape[1], self.capacity, states.shape[3]))
        if held is not None:
            grown[:, :, : held.shape[2]] = held
        return grown

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        for tensors in (self.keys, self.values):
            for held in tensors:
                if held is not None:
                    held[target, :, :length] = held[source, :, :length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan
        assert plan is not None, "the engine sets where a forward pass writes before running it"
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        keys = self.keys[layer_idx] = self._grown(self.keys[layer_idx], key_states)
        values = self.values[layer_idx] = self._grown(self.values[layer_idx], value_states)
        if plan.single is not None:  # one generating slot: plain indexing, cheaper than an index_put
            row, slot, position = plan.single
            keys[slot, :, position] = key_states[row, :, 0]
            values[slot, :, position] = value_states[row, :, 0]
        elif plan.rows is not None:
            assert plan.slots is not None and plan.positions is not None
            device = keys.device
            rows, slots, positions = plan.rows.to(device), plan.slots.to(device), plan.positions.to(device)
            keys[slots, :, positions] = key_states[rows, :, 0]
            values[slots, :, positions] = value_states[rows, :, 0]
        else:
            end = plan.start + key_states.shape[2]
            keys[plan.first, :, plan.start : end] = key_states[0]
            values[plan.first, :, plan.start : end] = value_states[0]
        return keys[plan.first : plan.last, :, : plan.length], values[plan.first : plan.last, :, : plan.length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given; there is no one length for all rows


class TransformersEngine(SlotEngine):
    library = "transformers"

    def __init__(
        self,
        model: Any,
        *,
        name: str,
        slots: int,
        context_size: int,
        eos_ids: frozenset[int],
        cache_argument: str,
        token_bytes: Callable[[int], bytes],
    ) -> None:
        super().__init__(name, slots)
        self.threads = torch.get_num_threads()  # what the load left; the thread budget may change it (set_threads)
        self._model = model
        self._eos_ids = eos_ids
        self._cache_argument = cache_argument
        self._token_bytes = token_bytes
        self._device = model.get_input_embeddings().weight.device
        self._dtype = model.dtype
        self._keeps_logits = "logits_to_keep" in _forward_parameters(model)
        self.context_size = context_size
        self.cache = SlotCache(slots, context_size)
        self.start()

    # --- from other threads ---------------------------------------------------------------------------

    def close(self) -> None:
        """End every request (with an error event), stop the thread and drop the cache."""
        self.stop()
        self.cache = SlotCache(len(self.slots), self.context_size)

    def describe(self) -> dict[str, Any]:
        """The slots and the prefix cache (``slot_stats``), and the cache's size."""
        return {
            **self.slot_stats(),
            "kv_cache_tokens": self.cache.capacity * len(self.slots),
            "kv_cache_bytes": self.cache.nbytes,
            "prefill_chunk": PREFILL_CHUNK,
            "threads": self.threads,
        }

    # --- the engine thread ---------------------------------------------------------------------------

    def _context(self) -> contextlib.AbstractContextManager[Any]:
        return torch.inference_mode()

    def _apply_threads(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.threads = threads

    def _assign(self, request: EngineRequest, idle: list[Slot]) -> None:
        prompt = list(request.prompt)
        slot, reuse, donor, shared = choose_slot(idle, self.slots, prompt)
        reuse_limit = len(prompt) - 1  # the last prompt token is always decoded: its logits give the first token
        if donor is not None and shared > reuse:
            reuse = min(shared, reuse_limit)
            self.cache.copy_prefix(donor.seq_id, slot.seq_id, reuse)
        else:
            reuse = min(reuse, reuse_limit)
        slot.cached = list(prompt[:reuse])  # what lies beyond is overwritten before anything attends to it
        slot.request = request
        slot.prompt_length = len(prompt)
        slot.fed = reuse
        slot.next_token = prompt[-1] if reuse == reuse_limit else None
        slot.generated = 0
        slot.assigned_at = time.monotonic()
        slot.sampler = TorchSampler(request.params, self._device)
        request.cached_tokens = reuse
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt)
        self.stats.cached_tokens += reuse

    def _release(self, slot: Slot) -> None:
        slot.sampler = None
        slot.next_token = None

    # --- one step ------------------------------------------------------------------------------------

    def _step(self) -> None:
        """One chunk of the oldest pending prompt, then one token for every generating slot.

        A prompt's last token is never part of a chunk: it is decoded with the generating slots, so that the
        first token's logits come out of the same computation whether the prompt was computed now or found in
        the cache (a seeded sample must not depend on which).
        """
        feeding = sorted((s for s in self._active() if s.next_token is None), key=lambda s: s.assigned_at)
        if feeding:
            self._guarded([feeding[0]], self._prefill, feeding[0])
        generating = sorted((s for s in self._active() if s.next_token is not None), key=lambda s: s.seq_id)
        if generating:
            self._guarded(generating, self._decode, generating)

    def _guarded(self, slots: list[Slot], run: Callable[[Any], None], argument: Any) -> None:
        """Run one forward pass; if it fails, the requests in it end with the error and forget their caches."""
        try:
            run(argument)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            logger.exception("%s: a forward pass failed", self.name)
            for slot in slots:
                slot.cached = []  # what the failed pass wrote is unknown
                if slot.request is not None:
                    self._finish(slot, "cancelled", error=GenerationError(f"The model failed to decode: {exc}"))
        finally:
            self.cache.plan = None

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if self._keeps_logits else {}
        output = self._model(
            input_ids=input_ids.to(self._device),
            position_ids=position_ids.to(self._device),
            attention_mask=mask.to(self._device),
            use_cache=True,
            **{self._cache_argument: self.cache},
            **extra,
        )
        logits: torch.Tensor = output.logits[:, -1, :]
        return logits

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """An additive 4-D mask from a boolean one: 0 where a query may attend, the dtype's minimum elsewhere."""
        blocked = torch.tensor(torch.finfo(self._dtype).min, dtype=self._dtype)
        return torch.where(allowed, torch.tensor(0.0, dtype=self._dtype), blocked)[:, None]

    def _prefill(self, slot: Slot) -> None:
        assert slot.request is not None
        prompt = slot.request.prompt
        start = slot.fed
        chunk = prompt[start : min(start + PREFILL_CHUNK, len(prompt) - 1)]
        end = start + len(chunk)
        self.cache.reserve(end)
        self.cache.plan = CacheWrite(first=slot.seq_id, last=slot.seq_id + 1, length=end, start=start)
        positions = torch.arange(start, end)
        allowed = torch.arange(end)[None, :] <= positions[:, None]  # causal, over the cache and the chunk
        self._forward(torch.tensor([chunk]), positions[None], self._mask(allowed[None]))
        slot.cached.extend(chunk)
        slot.fed = end
        if slot.fed == len(prompt) - 1:
            slot.next_token = prompt[-1]

    def _decode(self, generating: list[Slot]) -> None:
        first, last = generating[0].seq_id, generating[-1].seq_id + 1
        width = last - first
        tokens = torch.zeros((width, 1), dtype=torch.long)
        positions = torch.zeros((width, 1), dtype=torch.long)  # a row that is not generating attends to one cell
        for slot in generating:
            assert slot.next_token is not None
            tokens[slot.seq_id - first, 0] = slot.next_token
            positions[slot.seq_id - first, 0] = len(slot.cached)
        length = max(len(s.cached) for s in generating) + 1
        self.cache.reserve(length)
        rows = torch.tensor([s.seq_id - first for s in generating])
        self.cache.plan = CacheWrite(
            first=first,
            last=last,
            length=length,
            rows=rows,
            slots=rows + first,
            positions=positions[rows, 0],
            single=(0, first, len(generating[0].cached)) if len(generating) == 1 else None,
        )
        allowed = torch.arange(length)[None, :] <= positions  # [width, length]
        logits = self._forward(tokens, positions, self._mask(allowed[:, None])).float()
        self.batch_sizes.append(len(generating))
        for slot in generating:
            slot.cached.append(slot.next_token)  # type: ignore[arg-type]
            self._sample(slot, logits[slot.seq_id - first])

    def _sample(self, slot: Slot, raw: torch.Tensor) -> None:
        request = slot.request
        assert request is not None
        token = slot.sampler.sample(raw if request.constraint is None else request.constraint.allow_torch(raw))
        if token in self._eos_ids:
            self._finish(slot, "stop")
            return
        logprob = None
        if request.params.logprobs:  # of the model's own distribution: the raw logits, before the sampler
            logprob = token_logprob(raw.cpu().numpy(), token, request.params.top_logprobs, self._token_bytes)
        slot.generated += 1
        slot.next_token = token
        request.events.put(EngineEvent(token=token, logprob=logprob))
        self._took(slot, token)


def _forward_parameters(model: Any) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(model.forward).parameters)
