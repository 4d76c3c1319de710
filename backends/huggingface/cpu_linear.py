"""Faster CPU matrix products for the few rows a decode step has, chosen by timing them at load.

A decode step multiplies every weight matrix by one row per sequence. ``torch.nn.functional.linear`` computes
``x @ W.T``, and for one to a few rows in float32 the BLAS behind it (MKL here) takes a matrix-vector path
that reads the weights at well under the memory's speed: on the 2-core reference machine SmolLM2's output
layer (49152 x 576) took 13 ms for one row and 22 ms for four, against 4 ms and 7 ms for the same product
computed as ``W @ x.T`` with at least two columns. The products are the same sums in float32, in another
order: the outputs can differ in the last bits, as they do between batch sizes anyway.

Which way is faster depends on the shape, the row count, the dtype and the BLAS, so each weight shape is
timed both ways for 1, 2, 4 and 8 rows on the model's own weights when the model loads, and a row count takes
the faster way of the next timed count at or above it. Prompt chunks (more rows) keep ``linear``.
"""

from __future__ import annotations

import time
import types
from collections import defaultdict
from typing import Any

import torch

TIMED_ROWS = (1, 2, 4, 8)
REPEATS = 5


def _columns(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows @ weight.T`` as ``weight @ rows.T``: one row is padded to two, which takes the matrix path."""
    count = rows.shape[0]
    if count == 1:
        rows = torch.cat((rows, rows))  # a real second row: a stride-0 one is not taken as a matrix
    product = torch.mm(weight, rows.T)
    return product[:, :count].T.contiguous()


def _timed(run: Any) -> float:
    run()
    started = time.perf_counter()
    for _ in range(REPEATS):
        run()
    return time.perf_counter() - started


def tune_small_batch_linears(model: Any) -> dict[str, Any]:
    """Give every CPU ``nn.Linear`` of ``model`` the faster product for each small row count; returns what was
    chosen (per weight shape, the row counts that take ``W @ x.T``), for ``load_info``."""
    by_shape: dict[tuple[int, int, torch.dtype], list[torch.nn.Linear]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.device.type == "cpu":
            by_shape[(module.out_features, module.in_features, module.weight.dtype)].append(module)
    chosen: dict[str, Any] = {}
    with torch.inference_mode():
        for (out_features, in_features, dtype), modules in by_shape.items():
            faster: set[int] = set()
            weights = [m.weight for m in modules[:8]]  # several matrices, as a step reads them: not from a cache
            for rows in TIMED_ROWS:
                x = torch.randn(rows, in_features, dtype=dtype)
                plain = _timed(lambda x=x, weights=weights: [torch.nn.functional.linear(x, w) for w in weights])
                columns = _timed(lambda x=x, weights=weights: [_columns(w, x) for w in weights])
                if columns < 0.9 * plain:
                    faster.add(rows)
            if faster:
                use = frozenset(r for r in range(1, TIMED_ROWS[-1] + 1) if _bucket(r) in faster)
                for module in modules:
                    module.forward = types.MethodType(_forward_taking(use), module)  # type: ignore[method-assign]
            chosen[f"{out_features}x{in_features}"] = sorted(faster)
    return chosen


def _bucket(rows: int) -> int:
    return next(timed for timed in TIMED_ROWS if timed >= rows)


def _forward_taking(use: frozenset[int]) -> Any:
    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows not in use:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        out = _columns(self.weight, x.reshape(rows, self.in_features))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    return forward
