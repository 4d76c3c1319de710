"""The llama.cpp engine: one thread owns a context and decodes every active request together, a step at a time.

A context has ``slots`` sequences in one unified KV cache (llama.cpp's ``kv_unified``). Each step decodes one
token for every generating slot and fills the rest of the batch with chunks of pending prompts, never more
than ``n_batch`` tokens (more aborts the process), as ``llama-server``'s ``update_slots`` does. A slot keeps
the tokens of its last request: a new request goes to the idle slot that would lose the least of what it
holds (one whose history the prompt continues, else an empty one, else the least recently used), and the
longest prefix any slot holds is copied into it first (``llama_memory_seq_cp``, which in a unified cache only
marks cells as shared), so a dialogue computes only its new turn and the instances of one game compute
their rules once. What was reused is the request's ``cached_tokens``.

Requests come in through ``submit`` and their tokens go out through each request's queue; nothing but the
engine thread touches the context or a sampler. ``ctypes`` releases the GIL while llama.cpp decodes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from backends.engine.loop import SlotEngine
from backends.engine.slots import EngineEvent, EngineRequest, Slot, choose_slot
from backends.errors import GenerationError, KVCacheFullError
from backends.llamacpp.sampling import sampler_chain, token_piece
from backends.model import token_logprob

logger = logging.getLogger(__name__)


class LlamaCppEngine(SlotEngine):
    library = "llama.cpp"

    def __init__(
        self,
        model: Any,
        vocab: Any,
        *,
        name: str,
        slots: int,
        kv_size: int,
        n_batch: int = 512,
        threads: int = 1,
    ) -> None:
        import llama_cpp

        super().__init__(name, slots)
        self._llama = llama_cpp
        self._model = model
        self._vocab = vocab
        self.n_batch = n_batch
        self.kv_size = kv_size
        self.threads = threads
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = kv_size
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = slots
        params.kv_unified = True  # one pool for every slot: a shared prefix is stored once
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {kv_size} tokens for {slots} slots")
        self.kv_size = llama_cpp.llama_n_ctx(self._ctx)
        # Keys and values in f16 for every layer and KV head: what the cache holds in memory, near enough.
        head_dim = llama_cpp.llama_model_n_embd(model) // max(llama_cpp.llama_model_n_head(model), 1)
        per_token = 2 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head_dim * 2
        self.kv_bytes = per_token * self.kv_size
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.start()

    # --- from other threads ---------------------------------------------------------------------------

    def close(self) -> None:
        """End every request (with an error event), stop the thread and free the context."""
        self.stop()
        llama_cpp = self._llama
        for slot in self.slots:
            self._free_sampler(slot)
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self._ctx = None

    def describe(self) -> dict[str, Any]:
        """The slots and the prefix cache (``slot_stats``), and the context's own sizes."""
        return {
            **self.slot_stats(),
            "kv_cache_tokens": self.kv_size,
            "kv_cache_bytes": self.kv_bytes,
            "kv_cache_full_events": self.stats.kv_full_events,
            "threads": self.threads,
            "n_batch": self.n_batch,
        }

    # --- the engine thread ---------------------------------------------------------------------------

    def _apply_threads(self, threads: int) -> None:
        self._llama.llama_set_n_threads(self._ctx, threads, threads)
        self.threads = threads

    def _assign(self, request: EngineRequest, idle: list[Slot]) -> None:
        llama_cpp = self._llama
        prompt = list(request.prompt)
        slot, reuse, donor, shared = choose_slot(idle, self.slots, prompt)
        reuse_limit = len(prompt) - 1  # the last prompt token is always decoded: its logits give the first token
        if donor is not None and shared > reuse:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            reuse = min(shared, reuse_limit)
            llama_cpp.llama_memory_seq_cp(self._memory, donor.seq_id, slot.seq_id, 0, reuse)
            slot.cached = list(prompt[:reuse])
        else:
            reuse = min(reuse, reuse_limit)
            if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, reuse, -1):
                llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)  # a model that cannot cut a sequence
                reuse = 0
            slot.cached = slot.cached[:reuse]
        slot.request = request
        slot.prompt_length = len(prompt)
        slot.fed = reuse
        slot.next_token = prompt[-1] if reuse == reuse_limit else None
        slot.generated = 0
        slot.assigned_at = time.monotonic()
        slot.sampler = sampler_chain(llama_cpp, request.params, self.n_vocab, request.max_tokens)
        request.cached_tokens = reuse
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt)
        self.stats.cached_tokens += reuse

    def _free_sampler(self, slot: Slot) -> None:
        if slot.sampler is not None:
            self._llama.llama_sampler_free(slot.sampler)
            slot.sampler = None

    def _release(self, slot: Slot) -> None:
        self._free_sampler(slot)

    # --- one step ------------------------------------------------------------------------------------

    def _add(self, token: int, pos: int, seq_id: int, output: bool) -> int:
        batch = self._batch
        i: int = batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = output
        batch.n_tokens = i + 1
        return i

    def _fill_batch(self, with_prompts: bool) -> tuple[list[Slot], dict[int, tuple[int, int, int | None]]]:
        """One token for every generating slot, then prompt chunks; returns the slots that sample after the
        decode, and what each slot had before it, to roll back a decode that failed.

        A prompt's last token is never part of a chunk: it is decoded in the next step, like a generated token,
        so that the first token's logits come out of the same computation whether the prompt was computed now
        or found in the cache (a chunk and a single token take different kernels, and a seeded sample must not
        depend on which one ran).
        """
        self._batch.n_tokens = 0
        sampling: list[Slot] = []
        before: dict[int, tuple[int, int, int | None]] = {}
        active = sorted(self._active(), key=lambda s: s.assigned_at)
        for slot in active:
            if slot.next_token is not None:
                before[slot.seq_id] = (len(slot.cached), slot.fed, slot.next_token)
                slot.output = self._add(slot.next_token, len(slot.cached), slot.seq_id, True)
                slot.cached.append(slot.next_token)
                sampling.append(slot)
        room = self.n_batch - self._batch.n_tokens
        for slot in active if with_prompts else ():
            assert slot.request is not None
            prompt = slot.request.prompt
            if slot.next_token is not None or room <= 0:
                continue
            before[slot.seq_id] = (len(slot.cached), slot.fed, slot.next_token)
            take = min(room, len(prompt) - 1 - slot.fed)
            for token in prompt[slot.fed : slot.fed + take]:
                self._add(token, len(slot.cached), slot.seq_id, False)
                slot.cached.append(token)
            slot.fed += take
            room -= take
            if slot.fed == len(prompt) - 1:
                slot.next_token = prompt[-1]
        return sampling, before

    def _roll_back(self, before: dict[int, tuple[int, int, int | None]]) -> None:
        for slot in self.slots:
            if slot.seq_id in before:
                length, slot.fed, slot.next_token = before[slot.seq_id]
                del slot.cached[length:]

    def _free_idle_caches(self) -> bool:
        """Make room in the KV cache: forget what idle slots hold, least recently used first. False if none did."""
        freed = False
        for slot in sorted(self.slots, key=lambda s: s.last_used):
            if not slot.busy and slot.cached:
                self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
                slot.cached = []
                freed = True
                break
        return freed

    def _step(self) -> None:
        llama_cpp = self._llama
        for with_prompts in (True, False):
            sampling, before = self._fill_batch(with_prompts)
            if self._batch.n_tokens == 0:
                break  # only prompts were waiting, and they did not fit
            status = llama_cpp.llama_decode(self._ctx, self._batch)
            if status == 0:
                if sampling:
                    self.batch_sizes.append(len(sampling))
                self._sample(sampling)
                return
            self._roll_back(before)
            if status != 1:
                self._resync(before, status)
                return
            # No room in the KV cache (llama.cpp left it as it was): forget an idle slot's cache, or else go on
            # without prompt chunks, so that the generating slots make progress while the prompts wait.
            self.stats.kv_full_events += 1
            if self._free_idle_caches():
                return
        # Not even that fits: end the request holding the most of the cache, so that the others go on.
        victim = max(self._active(), key=lambda s: len(s.cached))
        logger.warning("%s: KV cache full (%d tokens); ending one request", self.name, self.kv_size)
        self._finish(
            victim,
            "cancelled",
            error=KVCacheFullError(
                f"The model's KV cache ({self.kv_size} tokens for all requests together) is full, so this "
                "request could not go on; retry it, or give the entry a larger kv_cache_size"
            ),
        )
        llama_cpp.llama_memory_seq_rm(self._memory, victim.seq_id, -1, -1)
        victim.cached = []

    def _resync(self, before: dict[int, tuple[int, int, int | None]], status: int) -> None:
        """After an aborted or failed decode, some ubatches may have been applied: drop those sequences' new
        cells and end their requests with an error; other slots are untouched."""
        for slot in self.slots:
            if slot.seq_id in before and slot.request is not None:
                length = before[slot.seq_id][0]
                self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, length, -1)
                self._finish(slot, "cancelled", error=GenerationError(f"llama.cpp failed to decode (status {status})"))
        logger.error("%s: llama_decode returned %d", self.name, status)

    def _sample(self, sampling: list[Slot]) -> None:
        llama_cpp = self._llama
        for slot in sampling:
            request = slot.request
            assert request is not None
            raw = None  # the logits before the mask, for logprobs
            if request.params.logprobs or request.constraint is not None:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, slot.output), (self.n_vocab,))
                if request.params.logprobs:
                    raw = logits.copy() if request.constraint is not None else logits
                if request.constraint is not None:  # the sampler reads these logits: mask them where they are
                    request.constraint.allow_numpy(logits)
            token = int(llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, slot.output))
            if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                self._finish(slot, "stop")
                continue
            logprob = None
            if raw is not None:  # of the model's own distribution: the raw logits, before the sampler
                logprob = token_logprob(raw, token, request.params.top_logprobs, self._piece_with_specials)
            slot.generated += 1
            slot.next_token = token
            request.events.put(EngineEvent(token=token, logprob=logprob))
            self._took(slot, token)

    def _piece_with_specials(self, token: int) -> bytes:
        return token_piece(self._llama, self._vocab, token, special=True)
