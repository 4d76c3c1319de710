"""The worker: one loaded model, its engine, tokenizer and grammars, behind calls that travel between processes.

A worker lives apart from the server's front (the HTTP app, the registry, the manager): in a process of its own
on this machine (``backends.hosts.process``) or as a Ray Serve replica (``proxy.ray_serve``). Both hosts run
this code, and both fronts read its answers with ``RemoteGeneration``, so there is one split, not two.

What crosses is plain data: a prompt as its text, token ids and room (``prompt_fields``), the
``GenerationParams``, and chunks of raw token pieces with the counts after each piece. The text is cleaned in
the front (``Model.generate``), where an edit of a request-time key such as ``eos_to_cull`` applies at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from backends.errors import BackendError, GenerationError
from backends.model import GenerationOutcome, GenerationParams, Model, PreparedPrompt
from backends.text.reasoning import ReasoningFormat, answer_grammar

_END = object()


def error_fields(exc: BackendError) -> dict[str, Any]:
    """An error as data, so that the front raises it again with the same status, type and code."""
    return {"message": exc.message, "status": exc.status, "type": exc.error_type, "code": exc.code, "param": exc.param}


class RemoteBackendError(BackendError):
    """An error a worker's backend raised, with the status, type and code it had there."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        super().__init__(str(fields["message"]), param=fields.get("param"), code=fields.get("code"))
        self.status = int(fields.get("status", 500))
        self.error_type = str(fields.get("type", "server_error"))


def prompt_fields(prompt: PreparedPrompt) -> dict[str, Any]:
    reasoning = prompt.reasoning.fields() if prompt.reasoning is not None else None
    return {"text": prompt.text, "token_ids": prompt.token_ids, "max_tokens": prompt.max_tokens, "reasoning": reasoning}


def prepared_from(answer: Mapping[str, Any]) -> PreparedPrompt:
    """The front's copy of a prompt a worker prepared (its grammar is compiled again where it generates)."""
    if "error" in answer:
        raise RemoteBackendError(answer["error"])
    return PreparedPrompt(
        text=answer["text"],
        token_ids=tuple(answer["token_ids"]),
        max_tokens=answer["max_tokens"],
        reasoning=ReasoningFormat.of(answer.get("reasoning")),
    )


class ModelWorker:
    """One registry entry's model, loaded where this runs; every call answers with data, never raises a
    ``BackendError`` (it becomes ``{"error": fields}``)."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def describe(self) -> dict[str, Any]:
        return {"context_size": self.model.context_size, "load_info": self.model.load_info()}

    def prepare(self, messages: Sequence[Mapping[str, Any]] | None, text: str | None, params: GenerationParams) -> Any:
        """The prompt's text, tokens and room, or the backend's error (a context overflow, a bad template)."""
        try:
            if messages is not None:
                prepared = self.model.prepare(messages, params)
            else:
                prepared = self.model.prepare_text(str(text), params)
        except BackendError as exc:
            return {"error": error_fields(exc)}
        return prompt_fields(prepared)

    def chunks(
        self,
        prompt: Mapping[str, Any],
        params: GenerationParams,
        cancel: threading.Event,
        *,
        most: int = 0,
        linger: float = 0.0,
    ) -> Iterator[dict[str, Any]]:
        """The raw generation as chunks: ``{"pieces": [(text, completion_tokens after it), ...], "logprobs": [...],
        "cached_tokens": n}``, then ``{"end": {...}}`` or ``{"error": fields}``.

        A chunk holds whatever the engine decoded by the time the last one was taken (one engine step, for a
        reader that keeps up), at most ``most`` pieces (0: no bound); with ``linger`` it waits that long for
        more after its first piece (a host whose messages cost milliseconds, like Ray Serve), except in the first
        chunk, so that the time to the first token stays low.
        """
        outcome = GenerationOutcome(prompt_tokens=len(prompt["token_ids"]))
        pieces: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def produce() -> None:
            try:
                constraint = None
                reasoning = ReasoningFormat.of(prompt.get("reasoning"))
                grammar = answer_grammar(params.grammar, reasoning, params.reasoning_budget)  # as Model.prepare
                if grammar is not None:
                    constraint = self.model.grammar_compiler().compile(grammar)
                prepared = PreparedPrompt(
                    text=prompt["text"],
                    token_ids=tuple(prompt["token_ids"]),
                    max_tokens=int(prompt["max_tokens"]),
                    constraint=constraint,
                )
                tokens = self.model.generate_tokens(prepared, params, cancel, outcome)
                try:
                    for piece in tokens:
                        pieces.put((piece, outcome.completion_tokens))
                        if cancel.is_set():
                            break
                finally:
                    tokens.close()
                self.model.tokens_generated += outcome.completion_tokens
            except BackendError as exc:
                pieces.put(exc)
            except Exception as exc:  # a bug, not a crash of the engine: this request fails, the worker goes on
                pieces.put(GenerationError(f"{type(exc).__name__}: {exc}"))
            pieces.put(_END)

        threading.Thread(target=produce, name=f"generate-{self.model.name}", daemon=True).start()
        sent_logprobs = 0
        ended = False
        first = True
        while not ended:
            taken = [pieces.get()]
            deadline = time.monotonic() + (0.0 if first else linger)
            first = False
            while not (most and len(taken) >= most) and taken[-1] is not _END:
                try:
                    wait = deadline - time.monotonic()
                    taken.append(pieces.get(timeout=wait) if wait > 0 else pieces.get_nowait())
                except queue.Empty:
                    break
            error = next((item for item in taken if isinstance(item, BackendError)), None)
            ended = taken[-1] is _END
            text = [item for item in taken if isinstance(item, tuple)]
            fresh = outcome.logprobs[sent_logprobs:]
            sent_logprobs += len(fresh)
            if text or fresh:
                yield {"pieces": text, "logprobs": fresh, "cached_tokens": outcome.cached_tokens}
            if error is not None:
                yield {"error": error_fields(error)}
                return
        yield {
            "end": {
                "finish_reason": outcome.finish_reason,
                "completion_tokens": outcome.completion_tokens,
                "cached_tokens": outcome.cached_tokens,
            }
        }


class RemoteGeneration:
    """The front's side of one generation: the worker's chunks as raw pieces, with ``outcome`` kept as the
    in-process engine keeps it (counts as of the piece last read, log probabilities one per token)."""

    def __init__(self, outcome: GenerationOutcome) -> None:
        self.outcome = outcome
        self.ended = False
        self._logprobs: list[Any] = []

    def pieces(self, chunk: Mapping[str, Any]) -> Iterator[str]:
        outcome = self.outcome
        if "pieces" in chunk:
            self._logprobs.extend(chunk["logprobs"])
            outcome.cached_tokens = chunk["cached_tokens"]
            for text, completion_tokens in chunk["pieces"]:
                outcome.completion_tokens = completion_tokens
                self._take_logprobs(completion_tokens)
                yield text
        elif "end" in chunk:
            self.ended = True
            end = chunk["end"]
            outcome.completion_tokens = end["completion_tokens"]
            outcome.cached_tokens = end["cached_tokens"]
            outcome.finish_reason = end["finish_reason"]
            self._take_logprobs(outcome.completion_tokens)
        elif "error" in chunk:
            self.ended = True
            raise RemoteBackendError(chunk["error"])

    def _take_logprobs(self, completion_tokens: int) -> None:
        logprobs = self.outcome.logprobs
        logprobs.extend(self._logprobs[len(logprobs) : completion_tokens])
