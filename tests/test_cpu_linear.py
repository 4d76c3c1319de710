"""The small-batch matrix products chosen at load (``backends.huggingface.cpu_linear``) give what ``linear`` gives,
to float32 rounding, for every weight of the real model and every row count a decode step can have."""

from __future__ import annotations

from typing import Any

import torch

from backends.huggingface.cpu_linear import _columns, tune_small_batch_linears


def test_every_tuned_weight_of_the_real_model_computes_what_linear_computes(smol_hf: Any) -> None:
    model = smol_hf._model
    # Which product is faster depends on the CPU (W @ x.T won for the output layer on one machine, linear on
    # another), so both are checked on every weight: the one the tuning chose, and W @ x.T itself.
    assert "49152x576" in smol_hf.load_info()["small_batch_kernels"]  # the output layer was timed
    torch.manual_seed(0)
    with torch.inference_mode():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                for shape in ((1, 1), (2, 1), (3, 1), (4, 1), (1, 7), (9, 1)):
                    x = torch.randn(*shape, module.in_features)
                    expected = torch.nn.functional.linear(x, module.weight, module.bias)
                    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)
                    columns = _columns(module.weight, x.reshape(-1, module.in_features)).reshape(expected.shape)
                    if module.bias is not None:
                        columns = columns + module.bias
                    torch.testing.assert_close(columns, expected, rtol=1e-4, atol=1e-4)


def test_a_bias_is_added_and_other_row_counts_keep_linear() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 512, bias=True))
    chosen = tune_small_batch_linears(model)
    assert set(chosen) == {"512x4096"}
    with torch.inference_mode():
        for rows in range(1, 20):
            x = torch.randn(rows, 4096)
            expected = torch.nn.functional.linear(x, model[0].weight, model[0].bias)
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
