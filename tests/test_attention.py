"""transformers' attention through rinna_cli.attention: the native kernel for an unmasked step of one row, SDPA's
path (the same function transformers runs) for everything else."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rinna_cli import attention, native

HEADS, SIZE = 4, 16


@pytest.fixture()
def calls(monkeypatch) -> list:
    seen: list = []
    real = native.Library.attend
    monkeypatch.setattr(native.Library, "attend", lambda self, q, *rest: seen.append(q.shape) or real(self, q, *rest))
    return seen


class Module(torch.nn.Module):
    is_causal = True


def _step(batch: int, rows: int, tokens: int, dtype=torch.float32):
    torch.manual_seed(6)
    return [torch.randn(batch, HEADS, n, SIZE).to(dtype) for n in (rows, tokens, tokens)]


def test_one_unmasked_row_takes_the_kernel_with_sdpas_result_and_layout(calls):
    q, k, v = _step(1, 1, 9)
    with torch.inference_mode():
        got, weights = attention.forward(Module(), q, k, v, None, scaling=0.3)
        want, _ = sdpa_attention_forward(Module(), q, k, v, None, scaling=0.3)
    assert calls == [(1, HEADS, 1, SIZE)] and weights is None
    assert got.shape == want.shape == (1, 1, HEADS, SIZE) and (got - want).abs().max() < 1e-6


@pytest.mark.parametrize(
    "case", ["mask", "two sequences", "a prompt", "float16", "fewer key heads", "dropout", "gradients"]
)
def test_everything_else_is_sdpas_exactly(calls, case):
    q, k, v = _step(2 if case == "two sequences" else 1, 3 if case == "a prompt" else 1, 9,
                    torch.float16 if case == "float16" else torch.float32)  # fmt: skip
    module = Module()
    if case == "fewer key heads":  # grouped-query attention, as transformers gives it
        k, v, module.num_key_value_groups = k[:, :2], v[:, :2], 2
    mask = torch.ones(1, 1, q.shape[2], 9, dtype=torch.bool) if case == "mask" else None
    dropout = 0.1 if case == "dropout" else 0.0
    context = torch.enable_grad() if case == "gradients" else torch.inference_mode()
    with context:
        torch.manual_seed(7)
        got, _ = attention.forward(module, q, k, v, mask, dropout=dropout, scaling=0.3)
        torch.manual_seed(7)
        want, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=0.3)
    assert calls == [] and torch.equal(got, want)
