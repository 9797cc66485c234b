"""Groupwise int4 weights for the CPU (``--quantize int4``): half the bytes of int8 per decode step.

Each row of a weight is cut into groups of :data:`GROUP_SIZE` inputs; a group keeps
4-bit codes 0..15 with its own scale and minimum (asymmetric, ``w ~ q * scale + min``),
stored in the layout of torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``),
packed once when the cache is written. That layout depends on the CPU's vector width
and on torch, so both are part of the cache key (:data:`FORMAT` and :func:`layout_tag`).

The output head stays int8 (:class:`rinna_cli.int8.Int8Linear`): it is 2.5 % of the
weights and the logits are where rounding shows most (llama.cpp keeps it wider too).
A layer whose shape the kernel cannot take (outputs not a multiple of 16, inputs not
a multiple of 32) stays int8 as well.
"""

from __future__ import annotations

import torch
from torch import nn

from rinna_cli.int8 import Int8Linear, QuantLinear

FORMAT = "rinna-cli-int4-v1"
# Measured on rinna's shapes (docs/benchmarks.md): 128 costs a little accuracy against 64
# and 32 and decodes fastest; it is also what the Xeon test used.
GROUP_SIZE = 128
_GROUPS = (GROUP_SIZE, 64, 32)
_INNER_K_TILES = 2


def layout_tag() -> str:
    """What the packed layout depends on besides :data:`FORMAT`."""
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"


def group_for(in_features: int, out_features: int) -> int:
    """The group size for a weight of this shape, or 0 if the int4 kernel cannot take it."""
    if out_features % 16:
        return 0
    return next((group for group in _GROUPS if in_features % group == 0), 0)


def quantize_weight(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes per group: (packed codes, scales and zeros of shape (in / group, out, 2), bfloat16)."""
    out_features, in_features = weight.shape
    codes, pairs = [], []
    for start in range(0, out_features, 1024):  # in slices: no float32 copy of a whole matrix
        block = weight[start : start + 1024].float().reshape(-1, in_features // group, group)
        low, high = block.amin(dim=2, keepdim=True), block.amax(dim=2, keepdim=True)
        scale = (high - low).clamp(min=1e-8) / 15.0
        codes.append(torch.round((block - low) / scale).clamp(0, 15).to(torch.int32).reshape(-1, in_features))
        pairs.append(torch.cat([scale, low + 8 * scale], dim=2))  # the kernel computes (q - 8) * scale + zero
    packed = torch._convert_weight_to_int4pack_for_cpu(torch.cat(codes), _INNER_K_TILES)
    scales_zeros = torch.cat(pairs).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_zeros


def _int4pack(dtype: torch.dtype):
    def kernel(module: Int4Linear, rows: torch.Tensor) -> torch.Tensor:
        """torch's CPU int4 kernel with activations (and scales) in ``dtype``."""
        pairs = module.derived(f"scales:{dtype}", lambda: module.scales_zeros.to(dtype))
        return torch._weight_int4pack_mm_for_cpu(rows.to(dtype).contiguous(), module.weight, module.group_size, pairs)

    return kernel


class Int4Linear(QuantLinear):
    """``y = x @ W.T + bias`` with ``W`` in groupwise int4, packed for torch's CPU kernel."""

    KERNELS = {"int4pack": _int4pack(torch.bfloat16), "int4pack_f32": _int4pack(torch.float32)}
    decode = prefill = "int4pack"

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, group_size: int = GROUP_SIZE):
        super().__init__(in_features, out_features, bias, device)
        self.group_size = group_size
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.scales_zeros = nn.Parameter(
            torch.zeros(in_features // group_size, out_features, 2, dtype=torch.bfloat16, device=device),
            requires_grad=False,
        )

    @classmethod
    def quantize(cls, linear: nn.Linear, group: int = 0) -> Int4Linear:
        group = group or group_for(linear.in_features, linear.out_features)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group)
        module.weight.data, module.scales_zeros.data = quantize_weight(linear.weight.detach(), group)
        if module.bias is not None:  # made with a bias exactly when linear has one
            module.bias.data = linear.bias.detach().float()
        return module

    def tensors(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cache tensors of this layer, called ``name`` in the model, from its full-precision weight."""
        packed, scales_zeros = quantize_weight(weight, self.group_size)
        return {f"{name}.weight": packed, f"{name}.scales_zeros": scales_zeros}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def choose(name: str, linear: nn.Linear) -> QuantLinear:
    """The quantized layer for ``linear`` (on the meta device) in an int4 model."""
    group = group_for(linear.in_features, linear.out_features)
    bias = linear.bias is not None
    if name == "lm_head" or not group:
        return Int8Linear(linear.in_features, linear.out_features, bias, "meta")
    return Int4Linear(linear.in_features, linear.out_features, bias, "meta", group)
