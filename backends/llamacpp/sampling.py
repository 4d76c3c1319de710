"""The llama.cpp engine's samplers and token pieces (the slot bookkeeping both engines share is in
``backends.engine.slots``)."""

from __future__ import annotations

import ctypes
import random
from typing import Any

from backends.model import GenerationParams


def sampler_chain(llama_cpp: Any, params: GenerationParams, n_vocab: int, max_tokens: int) -> Any:
    """A sampler chain for one request: OpenAI's penalties over the generated tokens, then temperature and
    nucleus (top_p), as the transformers backend samples; greedy at temperature 0."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if params.presence_penalty or params.frequency_penalty:
        penalties = llama_cpp.llama_sampler_init_penalties(
            n_vocab, max(max_tokens, 1), 1.0, params.frequency_penalty, params.presence_penalty
        )
        llama_cpp.llama_sampler_chain_add(chain, penalties)
    if params.temperature == 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    if params.top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    seed = params.seed if params.seed is not None else random.randrange(2**31)
    # 0xFFFFFFFF asks llama.cpp for a random seed; every other 32-bit value is taken as it is.
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed % 0xFFFFFFFF))
    return chain


def token_piece(llama_cpp: Any, vocab: Any, token: int, special: bool = False) -> bytes:
    """The bytes of one token (llama_token_to_piece; vocabulary only, safe from any thread)."""
    size = 64
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, special)
        if n >= 0:
            return buffer.raw[:n]
        size = -n
