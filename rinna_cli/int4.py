"""Groupwise int4 weights for the CPU (``--quantize int4``): half the bytes of int8 per decode step.

Each row of a weight is cut into groups of :data:`GROUP_SIZE` inputs; a group keeps
4-bit codes 0..15 with its own scale and zero in bfloat16 (asymmetric,
``w ~ (q - 8) * scale + zero``). The codes are stored in rinna-cli's own layout, the
same on every CPU (:func:`pack`: blocks of 64 inputs in 32 bytes, input ``j`` in the
low half of byte ``j`` and input ``32 + j`` in its high half), which its own kernel
``int4dot`` (:mod:`rinna_cli.native`) reads as they are: one pass over the weights per
decode step, at the memory's speed where torch's int4 kernel ran at a third of it (the
Zen 3 of docs/benchmarks.md). torch's kernel (``int4pack``) wants its own layout, which
depends on the CPU's vector width; it is made from the codes in memory when the plan
picks it (a machine without a C compiler), and the codes' pages are given back then.

torch's int4 kernel is slow for a prompt (on the AMX Xeon it took 32 ms for 48 rows of
one matrix, against 5.8 ms for ``_int_mm``), so each layer also keeps a *prompt copy*:
the int4 weights as dequantized, requantized to int8 per row, for ``_int_mm`` (the
prefill-only kernel ``int_mm``; where ``_int_mm`` is slow too, as on the Zen 3 with
torch 2.13, the planner gives prompts to ``int4dot`` and the copy is never read). It doubles the cache file, not memory: a layer's
copy is read for a prompt and its pages given back to the system right after
(:mod:`rinna_cli.mapped`), so the int4 weights and one matrix's copy are all that is
ever resident; the next prompt reads the copy again from the page cache (0.1–0.16 s for
rinna's 3.4 GB on the AVX-512 Xeon, once per prompt or chunk).

The output head stays int8 (:class:`rinna_cli.int8.Int8Linear`): it is 2.5 % of the
weights and the logits are where rounding shows most (llama.cpp keeps it wider too).
A layer whose shape the kernels cannot take (outputs not a multiple of 16, inputs not
a multiple of 64) stays int8 as well.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from rinna_cli import int8, mapped, native
from rinna_cli.int8 import Int8Linear, QuantLinear

FORMAT = "rinna-cli-int4-v3"
PROMPT_COPY = (".prompt_weight", ".prompt_scale")  # the parameters of the prompt copy, given back after each prompt
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
    blocks = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2, 32)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(codes.shape[0], -1)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """:func:`pack` undone: the codes (out, in) as int32."""
    blocks = packed.reshape(packed.shape[0], -1, 1, 32)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(packed.shape[0], -1).to(torch.int32)


def quantize_weight(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Asymmetric 4-bit codes per group and the int8 prompt copy of what they dequantize to.

    Returns the :class:`Int4Linear` tensors: ``weight`` (packed codes), ``scales_zeros``
    of shape (out, in / group, 2) in bfloat16, ``prompt_weight`` (out, in) int8 and its
    ``prompt_scale`` per row.
    """
    out_features, in_features = weight.shape
    codes = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
    pairs = torch.empty(out_features, in_features // group, 2, dtype=torch.bfloat16)
    prompt = torch.empty(out_features, in_features, dtype=torch.int8)
    prompt_scale = torch.empty(out_features, dtype=torch.float32)
    for start in range(0, out_features, 1024):  # in slices: no float32 copy of a whole matrix
        rows = slice(start, start + 1024)
        block = weight[rows].float().reshape(-1, in_features // group, group)
        low, high = block.amin(dim=2, keepdim=True), block.amax(dim=2, keepdim=True)
        scale = (high - low).clamp(min=1e-8) / 15.0
        q = torch.round((block - low) / scale).clamp(0, 15)
        pair = torch.cat([scale, low + 8 * scale], dim=2).to(torch.bfloat16)  # the kernels: (q - 8) * scale + zero
        codes[rows], pairs[rows] = pack(q.reshape(-1, in_features)), pair
        values = ((q - 8) * pair[..., :1].float() + pair[..., 1:].float()).reshape(-1, in_features)
        prompt[rows], prompt_scale[rows] = int8.quantize_weight(values)
    return {"weight": codes, "scales_zeros": pairs, "prompt_weight": prompt, "prompt_scale": prompt_scale}


def _int4dot(module: Int4Linear, rows: torch.Tensor) -> torch.Tensor:
    """rinna-cli's own int4 kernel on the codes as stored (int8 activations per group, :mod:`rinna_cli.native`)."""
    return native.library().int4dot(rows, module.weight, module.scales_zeros)


def _int4pack(dtype: torch.dtype):
    def kernel(module: Int4Linear, rows: torch.Tensor) -> torch.Tensor:
        """torch's CPU int4 kernel with activations (and scales) in ``dtype``, on its layout made from the codes."""
        packed = module.derived("int4pack", module.torch_layout)
        pairs = module.derived(f"scales:{dtype}", lambda: module.scales_zeros.transpose(0, 1).contiguous().to(dtype))
        return torch._weight_int4pack_mm_for_cpu(rows.to(dtype).contiguous(), packed, module.group_size, pairs)

    return kernel


def _prompt_int_mm(module: Int4Linear, rows: torch.Tensor) -> torch.Tensor:
    """``_int_mm`` on the int8 prompt copy (int8 activations), whose pages are given back after the call."""
    y = int8.int_mm(rows, module.prompt_weight, module.prompt_scale)
    if module.prompt_pages is not None:  # the cache maps it (a model quantized in memory keeps its copy)
        module.prompt_pages.release()
    return y


class Int4Linear(QuantLinear):
    """``y = x @ W.T + bias`` with ``W`` in groupwise int4 (:func:`pack`)."""

    KERNELS = {
        "int4dot": _int4dot,
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
            torch.zeros(out_features, in_features // group_size, 2, dtype=torch.bfloat16, device=device),
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

    def prepare(self, kernels: tuple[str, ...] = ()) -> None:
        if TORCH_LAYOUT.intersection(kernels or (self.decode, self.batch)):
            self.derived("int4pack", self.torch_layout)

    def torch_layout(self) -> torch.Tensor:
        """The codes in torch's int4 layout; the cache's pages of ours are given back (the plan does not read them)."""
        packed = torch._convert_weight_to_int4pack_for_cpu(unpack(self.weight), _INNER_K_TILES)
        pages = mapped.file_pages(self.weight)
        if pages is not None:
            pages.release()
        return packed

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
