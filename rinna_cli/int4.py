"""Groupwise int4 weights for the CPU (``--quantize int4``): half the bytes of int8 per decode step.

Each row of a weight is cut into groups of :data:`GROUP_SIZE` inputs; a group keeps
4-bit codes 0..15 with its own scale and minimum (asymmetric, ``w ~ q * scale + min``),
stored in the layout of torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``),
packed once when the cache is written. That layout depends on the CPU's vector width
and on torch, so both are part of the cache key (:data:`FORMAT` and :func:`layout_tag`).

torch's int4 kernel is fast for a decode step and slow for a prompt (on the AMX Xeon
32 ms for 48 rows of one matrix, against 5.8 ms for ``_int_mm``), so each layer also
keeps a *prompt copy*: the int4 weights as dequantized, requantized to int8 per row,
for ``_int_mm`` (the prefill-only kernel ``int_mm``). It doubles the cache file, not
memory: a layer's copy is read for a prompt and its pages given back to the system
right after (:mod:`rinna_cli.mapped`), so the int4 weights and one matrix's copy are
all that is ever resident; the next prompt reads the copy again from the page cache
(0.1–0.16 s for rinna's 3.4 GB on the AVX-512 Xeon, once per prompt or chunk).

The output head stays int8 (:class:`rinna_cli.int8.Int8Linear`): it is 2.5 % of the
weights and the logits are where rounding shows most (llama.cpp keeps it wider too).
A layer whose shape the kernel cannot take (outputs not a multiple of 16, inputs not
a multiple of 32) stays int8 as well.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from rinna_cli import int8, mapped
from rinna_cli.int8 import Int8Linear, QuantLinear

FORMAT = "rinna-cli-int4-v2"
PROMPT_COPY = (".prompt_weight", ".prompt_scale")  # the parameters of the prompt copy, given back after each prompt
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


def quantize_weight(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Asymmetric 4-bit codes per group and the int8 prompt copy of what they dequantize to.

    Returns the :class:`Int4Linear` tensors: ``weight`` (packed codes), ``scales_zeros``
    of shape (in / group, out, 2) in bfloat16, ``prompt_weight`` (out, in) int8 and its
    ``prompt_scale`` per row.
    """
    out_features, in_features = weight.shape
    codes, pairs = [], []
    prompt = torch.empty(out_features, in_features, dtype=torch.int8)
    prompt_scale = torch.empty(out_features, dtype=torch.float32)
    for start in range(0, out_features, 1024):  # in slices: no float32 copy of a whole matrix
        block = weight[start : start + 1024].float().reshape(-1, in_features // group, group)
        low, high = block.amin(dim=2, keepdim=True), block.amax(dim=2, keepdim=True)
        scale = (high - low).clamp(min=1e-8) / 15.0
        q = torch.round((block - low) / scale).clamp(0, 15)
        pair = torch.cat([scale, low + 8 * scale], dim=2).to(torch.bfloat16)  # the kernel: (q - 8) * scale + zero
        codes.append(q.to(torch.int32).reshape(-1, in_features))
        pairs.append(pair)
        values = ((q - 8) * pair[..., :1].float() + pair[..., 1:].float()).reshape(-1, in_features)
        rows = slice(start, start + 1024)
        prompt[rows], prompt_scale[rows] = int8.quantize_weight(values)
    return {
        "weight": torch._convert_weight_to_int4pack_for_cpu(torch.cat(codes), _INNER_K_TILES),
        "scales_zeros": torch.cat(pairs).transpose(0, 1).contiguous(),
        "prompt_weight": prompt,
        "prompt_scale": prompt_scale,
    }


def _int4pack(dtype: torch.dtype):
    def kernel(module: Int4Linear, rows: torch.Tensor) -> torch.Tensor:
        """torch's CPU int4 kernel with activations (and scales) in ``dtype``."""
        pairs = module.derived(f"scales:{dtype}", lambda: module.scales_zeros.to(dtype))
        return torch._weight_int4pack_mm_for_cpu(rows.to(dtype).contiguous(), module.weight, module.group_size, pairs)

    return kernel


def _prompt_int_mm(module: Int4Linear, rows: torch.Tensor) -> torch.Tensor:
    """``_int_mm`` on the int8 prompt copy (int8 activations), whose pages are given back after the call."""
    y = int8.int_mm(rows, module.prompt_weight, module.prompt_scale)
    if module.prompt_pages is not None:  # the cache maps it (a model quantized in memory keeps its copy)
        module.prompt_pages.release()
    return y


class Int4Linear(QuantLinear):
    """``y = x @ W.T + bias`` with ``W`` in groupwise int4, packed for torch's CPU kernel."""

    KERNELS = {
        "int4pack": _int4pack(torch.bfloat16),
        "int4pack_f32": _int4pack(torch.float32),
        "int_mm": _prompt_int_mm,
    }
    PREFILL_ONLY = frozenset({"int_mm"})
    decode = batch = prefill = "int4pack"

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
        self.prompt_weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.prompt_scale = nn.Parameter(
            torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False
        )

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

    @functools.cached_property
    def prompt_pages(self) -> mapped.Pages | None:
        """Where the cache file maps the prompt copy (looked up at its first use: it never moves)."""
        return mapped.file_pages(self.prompt_weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def choose(name: str, linear: nn.Linear) -> QuantLinear:
    """The quantized layer for ``linear`` (on the meta device) in an int4 model."""
    group = group_for(linear.in_features, linear.out_features)
    bias = linear.bias is not None
    if name == "lm_head" or not group:
        return Int8Linear(linear.in_features, linear.out_features, bias, "meta")
    return Int4Linear(linear.in_features, linear.out_features, bias, "meta", group)
