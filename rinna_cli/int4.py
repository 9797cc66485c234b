"""Groupwise int4 weights for the CPU (``--quantize int4``): half the bytes of int8 per decode step.

Each row of a weight is cut into groups of :data:`GROUP_SIZE` inputs; a group keeps
4-bit codes 0..15 with its own scale and zero in bfloat16 (asymmetric,
``w ~ (q - 8) * scale + zero``). The codes are stored in rinna-cli's own layout, the
same on every CPU (:func:`pack`): panels of 16 rows, each 8 inputs of a panel in 64
bytes, the 16 rows' codes of 4 inputs in the low halves and of the next 4 in the high
halves; the scales and zeros likewise by panel (:func:`panel_pairs`). Its own kernel
``int4dot`` (:mod:`rinna_cli.native`) reads them as they are, a lane of a vector per
output row, so one kernel serves a decode step (one pass over the weights, at the
memory's speed where torch's int4 kernel ran at a third of it on the Zen 3 of
docs/benchmarks.md) and a prompt (compute-bound, 25–30 % faster than oneDNN's int8 GEMM on
the Zen 4 of 2026-12-04), and gives a row the same bits in either. torch's kernel
(``int4pack``) wants its own layout, which depends on the CPU's vector width; it is made
from the codes in memory when the plan picks it (a machine without a C compiler), and
the codes' pages are given back then.

The output head stays int8 (:class:`rinna_cli.int8.Int8Linear`): it is 2.5 % of the
weights and the logits are where rounding shows most (llama.cpp keeps it wider too).
A layer whose shape the kernels cannot take (outputs not a multiple of 16, inputs not
a multiple of 64) stays int8 as well.
"""

from __future__ import annotations

import torch
from torch import nn

from rinna_cli import mapped, native
from rinna_cli.int8 import Int8Linear, QuantLinear

FORMAT = "rinna-cli-int4-v4"
PANEL = 16  # rows whose codes are stored together (pack)
# Measured on rinna's shapes (docs/benchmarks.md): 128 costs a little accuracy against 64
# and 32 and decodes fastest; it is also what the Xeon test used.
GROUP_SIZE = 128
_GROUPS = (GROUP_SIZE, 64)  # int4dot takes multiples of 64
_INNER_K_TILES = 2
TORCH_LAYOUT = frozenset({"int4pack", "int4pack_f32"})  # the kernels that read torch's layout, not the codes


def group_for(in_features: int, out_features: int) -> int:
    """The group size for a weight of this shape, or 0 if the int4 kernels cannot take it."""
    if out_features % 16:
        return 0
    return next((group for group in _GROUPS if in_features % group == 0), 0)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of shape (out, in) as rinna-cli's layout: (out, in / 2) uint8, see the module's docstring."""
    out_features, in_features = codes.shape
    blocks = codes.to(torch.uint8).reshape(out_features // PANEL, PANEL, in_features // 8, 2, 4).transpose(1, 2)
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(out_features, in_features // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """:func:`pack` undone: the codes (out, in) as int32."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    blocks = packed.reshape(out_features // PANEL, in_features // 8, PANEL, 1, 4)
    codes = torch.cat([blocks & 15, blocks >> 4], dim=3).transpose(1, 2)
    return codes.reshape(out_features, in_features).to(torch.int32)


def panel_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """(scale, zero) per row and group, (out, groups, 2), as ``int4dot`` reads them: (out / 16, groups, 2, 16)."""
    return pairs.reshape(pairs.shape[0] // PANEL, PANEL, *pairs.shape[1:]).permute(0, 2, 3, 1).contiguous()


def row_pairs(panels: torch.Tensor) -> torch.Tensor:
    """:func:`panel_pairs` undone."""
    return panels.permute(0, 3, 1, 2).reshape(-1, panels.shape[1], 2)


def quantize_weight(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Asymmetric 4-bit codes per group: the :class:`Int4Linear` tensors ``weight`` (packed codes) and
    ``scales_zeros`` (:func:`panel_pairs`) in bfloat16."""
    out_features, in_features = weight.shape
    codes = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
    pairs = torch.empty(out_features, in_features // group, 2, dtype=torch.bfloat16)
    for start in range(0, out_features, 1024):  # in slices of whole panels: no float32 copy of a whole matrix
        rows = slice(start, start + 1024)
        block = weight[rows].float().reshape(-1, in_features // group, group)
        low, high = block.amin(dim=2, keepdim=True), block.amax(dim=2, keepdim=True)
        scale = (high - low).clamp(min=1e-8) / 15.0
        q = torch.round((block - low) / scale).clamp(0, 15)
        codes[rows] = pack(q.reshape(-1, in_features))
        # the kernels dequantize (q - 8) * scale + zero
        pairs[rows] = torch.cat([scale, low + 8 * scale], dim=2).to(torch.bfloat16)
    return {"weight": codes, "scales_zeros": panel_pairs(pairs)}


def _int4dot(module: Int4Linear, rows: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """rinna-cli's own int4 kernel on the codes as stored (int8 activations per group, :mod:`rinna_cli.native`), its
    output finished (``FINISHING``)."""
    return native.library().int4dot(rows, module.weight, module.scales_zeros, dtype, bias)


def _int4pack(dtype: torch.dtype):
    def kernel(module: Int4Linear, rows: torch.Tensor) -> torch.Tensor:
        """torch's CPU int4 kernel with activations (and scales) in ``dtype``, on its layout made from the codes."""
        packed = module.derived("int4pack", module.torch_layout)
        pairs = module.derived(
            f"scales:{dtype}", lambda: row_pairs(module.scales_zeros).transpose(0, 1).contiguous().to(dtype)
        )
        return torch._weight_int4pack_mm_for_cpu(rows.to(dtype).contiguous(), packed, module.group_size, pairs)

    return kernel


class Int4Linear(QuantLinear):
    """``y = x @ W.T + bias`` with ``W`` in groupwise int4 (:func:`pack`)."""

    KERNELS = {
        "int4dot": _int4dot,
        "int4pack": _int4pack(torch.bfloat16),
        "int4pack_f32": _int4pack(torch.float32),
    }
    SAME_ROWS = frozenset({"int4dot"})  # a row's bits whatever the rows multiplied with it
    FINISHING = frozenset({"int4dot"})
    decode = batch = prefill = "int4pack"

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, group_size: int = GROUP_SIZE):
        super().__init__(in_features, out_features, bias, device)
        self.group_size = group_size
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.scales_zeros = nn.Parameter(
            torch.zeros(out_features // PANEL, in_features // group_size, 2, PANEL, dtype=torch.bfloat16,
                        device=device),
            requires_grad=False,
        )  # fmt: skip

    @classmethod
    def quantize(cls, linear: nn.Linear, group: int = 0) -> Int4Linear:
        group = group or group_for(linear.in_features, linear.out_features)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group)
        for name, tensor in quantize_weight(linear.weight.detach(), group).items():
            getattr(module, name).data = tensor
        if module.bias is not None:  # made with a bias exactly when linear has one
            module.bias.data = linear.bias.detach().float()
        return module

    def tensors(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cache tensors of this layer, called ``name`` in the model, from its full-precision weight."""
        return {f"{name}.{key}": tensor for key, tensor in quantize_weight(weight, self.group_size).items()}

    def native_weights(self) -> native.Weights | None:
        return (
            native.Weights(self.weight, self.scales_zeros, self.group_size, self.bias)
            if self.decode == "int4dot"
            else None
        )

    def prepare(self, kernels: tuple[str, ...] = ()) -> None:
        if TORCH_LAYOUT.intersection(kernels or (self.decode, self.batch, self.prefill)):
            self.derived("int4pack", self.torch_layout)

    def torch_layout(self) -> torch.Tensor:
        """The codes in torch's int4 layout; the cache's pages of ours are given back (the plan does not read them)."""
        packed = torch._convert_weight_to_int4pack_for_cpu(unpack(self.weight), _INNER_K_TILES)
        pages = mapped.file_pages(self.weight)
        if pages is not None:
            pages.release()
        return packed

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def choose(name: str, linear: nn.Linear) -> QuantLinear:
    """The quantized layer for ``linear`` (on the meta device) in an int4 model."""
    group = group_for(linear.in_features, linear.out_features)
    bias = linear.bias is not None
    if name == "lm_head" or not group:
        return Int8Linear(linear.in_features, linear.out_features, bias, "meta")
    return Int4Linear(linear.in_features, linear.out_features, bias, "meta", group)
