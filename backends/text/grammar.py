"""Constrained decoding with llguidance, for both backends: a grammar masks the logits of each sequence we decode.

A request's constraint is a grammar in llguidance's own format (``json_schema_grammar``, ``lark_grammar``). A
loaded model has one ``GrammarCompiler``, made from its own vocabulary (an HF fast tokenizer, or a llama.cpp
vocab); it compiles each grammar once (``compile``, cached) and gives every sequence a matcher of its own, a copy
of the compiled one (``CompiledGrammar.matcher``). The engine asks that matcher for a mask before it samples
(``SequenceMatcher.allow_numpy`` / ``allow_torch``) and tells it the token it chose (``accept``); the end of
sequence is allowed only where the grammar may end, and a grammar that has ended stops the sequence.

Whitespace inside JSON is not free: the model writes JSON on one line as ``json.dumps`` does (``", "`` and
``": "``), so a small model cannot wander into endless spaces and newlines, as it can when whitespace is
flexible. ``with_json_options`` puts the same options into a schema that a Lark grammar embeds (``%json``).
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np

from backends.errors import ConstraintUnavailableError, GenerationError, GrammarError

# JSON as Python's json.dumps writes it, the form models see most: ", " and ": ", no other whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHED_GRAMMARS = 64  # compiled grammars a model keeps, least recently used dropped first
# What a token's logit gets added, by its bit in the mask: forbidden, allowed.
_ALLOWED_PENALTY = np.array([-np.inf, 0.0], dtype=np.float32)


def _llguidance() -> Any:
    import llguidance

    return llguidance


def with_json_options(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with llguidance's JSON options in it (``x-guidance``), for a ``%json`` inside a Lark grammar."""
    return {**schema, "x-guidance": JSON_OPTIONS}


def json_schema_grammar(schema: Any) -> str:
    """llguidance's grammar for a JSON Schema (a dict), with ``JSON_OPTIONS``; unchecked (``check_json_schema``)."""
    return str(_llguidance().LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS))


def lark_grammar(text: str) -> str:
    return str(_llguidance().LLMatcher.grammar_from_lark(text))


@lru_cache(maxsize=256)
def grammar_problem(grammar: str) -> str:
    """Why llguidance cannot enforce a grammar (its own message), or "" when it can; needs no tokenizer."""
    return str(_llguidance().LLMatcher.validate_grammar(grammar))


def check_json_schema(schema: Any, param: str) -> str:
    """The grammar of a JSON Schema, or a ``GrammarError`` naming ``param`` and what is wrong with the schema."""
    if not isinstance(schema, dict):
        raise GrammarError(f"'{param}' must be a JSON Schema object", param=param)
    try:
        grammar = json_schema_grammar(schema)
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"'{param}' is not a valid JSON Schema: {exc}", param=param) from exc
    problem = grammar_problem(grammar)
    if problem:
        raise GrammarError(f"'{param}' cannot be enforced: {_one_line(problem)}", param=param)
    return grammar


def _one_line(message: str) -> str:
    """llguidance's message on one line (it may draw a caret under the part of a regex it could not parse)."""
    return " ".join(message.split())[:500]


class SequenceMatcher:
    """One sequence's grammar state: the mask of the tokens it allows next, and the tokens it has taken."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self._matcher = matcher
        self.n_vocab = n_vocab
        self._words = np.full((1, (n_vocab + 31) // 32), -1, dtype=np.int32)

    def allowed(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """1 for each of the ``n_vocab`` tokens the grammar allows next, 0 for the others."""
        row = self._words[0]
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        return np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self.n_vocab]

    def penalty(self) -> np.ndarray[Any, np.dtype[np.float32]]:
        """What to add to the logits: 0 where the grammar allows a token, -inf elsewhere (a look-up and an add
        are four times faster than writing -inf through a boolean index)."""
        return np.take(_ALLOWED_PENALTY, self.allowed())

    def allow_numpy(self, logits: np.ndarray[Any, Any]) -> None:
        """Mask a row of ``n_vocab`` logits in place: what the grammar forbids gets -inf."""
        np.add(logits, self.penalty(), out=logits)

    def allow_torch(self, logits: Any) -> Any:
        """A masked copy of a row of ``n_vocab`` logits (a 1-D torch tensor)."""
        import torch

        return logits + torch.from_numpy(self.penalty()).to(logits.device)

    def accept(self, token: int) -> None:
        """Take the token the sampler chose; it was allowed, so only a bug makes this fail (``GenerationError``)."""
        if not self._matcher.consume_token(token):
            raise GenerationError(f"The grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def ended(self) -> bool:
        """The grammar is complete and allows nothing more, not even a longer match."""
        return bool(self._matcher.is_stopped())


class CompiledGrammar:
    """A grammar compiled for one vocabulary; ``matcher`` gives each sequence its own copy of it."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self._template = matcher
        self._n_vocab = n_vocab
        self._lock = threading.Lock()

    def matcher(self) -> SequenceMatcher:
        with self._lock:
            return SequenceMatcher(self._template.deep_copy(), self._n_vocab)


class GrammarCompiler:
    """A model's vocabulary as llguidance sees it, and the grammars compiled for it (the last ``CACHED_GRAMMARS``)."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        self._tokenizer = tokenizer
        self.n_vocab = n_vocab
        self._compiled: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compilations = 0  # grammars compiled, not taken from the cache: for operators and tests

    @classmethod
    def for_hf_tokenizer(cls, tokenizer: Any, n_vocab: int, eos_ids: Iterable[int]) -> GrammarCompiler:
        from transformers import PreTrainedTokenizerFast

        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise ConstraintUnavailableError(
                f"structured output needs a fast tokenizer, and this model has {type(tokenizer).__name__} "
                "(the entry sets slow_tokenizer)"
            )
        import llguidance.hf

        eos = sorted(set(eos_ids)) or None
        return cls(llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos), n_vocab)

    @classmethod
    def for_llama_vocab(cls, vocab: Any, n_vocab: int, eos_ids: Iterable[int]) -> GrammarCompiler:
        import llguidance.llamacpp

        eos = sorted(set(eos_ids)) or None
        with warnings.catch_warnings():  # it asks for each token's attributes by their deprecated name
            warnings.simplefilter("ignore", DeprecationWarning)
            tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(vocab, n_vocab=n_vocab, eos_token=eos)
        return cls(tokenizer, n_vocab)

    def compile(self, grammar: str) -> CompiledGrammar:
        """The grammar compiled for this vocabulary, from the cache when it was compiled before."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled
        problem = grammar_problem(grammar)
        if problem:
            raise GrammarError(f"the grammar cannot be enforced: {_one_line(problem)}")
        matcher = _llguidance().LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar cannot be enforced: {_one_line(matcher.get_error())}")
        compiled = CompiledGrammar(matcher, self.n_vocab)
        with self._lock:
            self.compilations += 1
            self._compiled[grammar] = compiled
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled
