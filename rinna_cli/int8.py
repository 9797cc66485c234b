"""int8 weights for the CPU, and what every quantized linear layer shares.

Every ``nn.Linear`` (attention, MLP and the output head, 97 % of rinna's
parameters) becomes an :class:`Int8Linear`: int8 weights with one scale per
output channel (symmetric, absmax). Embeddings and layer norms stay in floating
point. The quantized state dict is written once to a safetensors file in the
cache directory (:class:`SafetensorsWriter`, every tensor 64-byte aligned) and
later starts memory-map it and use the tensors in place.

Which kernel multiplies is not fixed here: :class:`QuantLinear` runs its
``decode`` kernel for a few rows and its ``prefill`` kernel for more, and
:mod:`rinna_cli.kernels` sets both by measuring them on the machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from rinna_cli import native

FORMAT = "rinna-cli-int8-v3"
# The dtype of the float tensors in the cache (embeddings, layer norms, biases); the
# plan converts them to its activation dtype when it is another (bfloat16).
ACTIVATION_DTYPE = torch.float32
# A matmul with at most this many rows is a decode step (one row per sequence, batched
# sequences included); more rows is a prefill.
DECODE_ROWS = 8


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 with one float32 scale per output channel (row).

    Worked in slices of about 2**20 values into the result: no temporary the size of the
    matrix (a float32 copy, its absolute values, int8 rows before joining them), which on
    a full-width layer of rinna would add as much again as its float16 weights.
    """
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    step = max(1, 2**20 // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        block = weight[rows].to(torch.float32, copy=True)
        torch.amax(block.abs(), dim=1, out=scale[rows])
        scale[rows].clamp_(min=1e-8).div_(127.0)
        q[rows] = block.div_(scale[rows, None]).round_().clamp_(-127, 127)
    return q, scale


class QuantLinear(nn.Module):
    """A linear layer over quantized weights: ``decode`` kernel for one row, ``batch`` for a few, ``prefill`` for more.

    Subclasses list their kernels in ``KERNELS`` (name -> function of the module and a
    2-D input), those never worth running for one row in ``PREFILL_ONLY``, and in
    ``SAME_ROWS`` those whose every output row is exactly the same whichever of them runs
    (so a sequence decoding alone and in a batch gets the same reply). A kernel returns
    any float dtype, which :meth:`output` casts to the activation dtype before adding the
    bias; one in ``FINISHING`` is also given ``dtype`` and ``bias`` and returns that
    finished output itself, with the same bits (rinna-cli's own, which save a decode step
    two torch operations a layer).
    """

    KERNELS: dict[str, Callable[..., torch.Tensor]] = {}
    PREFILL_ONLY: frozenset[str] = frozenset()
    SAME_ROWS: frozenset[str] = frozenset()
    FINISHING: frozenset[str] = frozenset()
    decode = batch = prefill = ""
    activation = ACTIVATION_DTYPE

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=ACTIVATION_DTYPE, device=device), requires_grad=False)
            if bias
            else None
        )
        self._derived: dict[str, torch.Tensor] = {}

    def derived(self, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor derived from the weights for a kernel (a scale in another dtype, another layout), made once."""
        if name not in self._derived:
            self._derived[name] = make()
        return self._derived[name]

    def forget(self) -> None:
        """Drop the derived tensors (made again when a kernel asks)."""
        self._derived.clear()

    def prepare(self, kernels: tuple[str, ...] = ()) -> None:
        """Derive now what ``kernels`` (default: the chosen ones) need, so that loading takes the time and not the
        first reply, nor the timing of a kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        kernel = self.decode if count == 1 else self.batch if count <= DECODE_ROWS else self.prefill
        return self.output(kernel, rows, self.activation).reshape(*x.shape[:-1], self.out_features)

    def output(self, kernel: str, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``rows`` (m, in) times the weights by ``kernel``, in ``dtype``, plus the bias: ``y.to(dtype) + bias``."""
        bias = self.bias if self.bias is None or self.bias.dtype == dtype else self.bias.to(dtype)
        if kernel in self.FINISHING:
            return self.KERNELS[kernel](self, rows, dtype=dtype, bias=bias)
        y = self.KERNELS[kernel](self, rows).to(dtype)
        return y if bias is None else y + bias

    def native_weights(self) -> native.Weights | None:
        """This layer's tensors for rinna-cli's kernel where that kernel decodes it (a fused decode step calls it from C,
        :mod:`rinna_cli.attention`), else None."""
        return None

    def rowwise(self) -> bool:
        """Whether a row's output is the same whatever rows it is multiplied with (one kernel, or all in SAME_ROWS)."""
        kernels = {self.decode, self.batch, self.prefill}
        return len(kernels) == 1 or kernels <= self.SAME_ROWS

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"decode={self.decode}, batch={self.batch}, prefill={self.prefill}"
        )


def int_mm(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic int8 activations (absmax) times int8 ``weight`` (out, in), int32 sums (``torch._int_mm``)."""
    rows = rows.float()
    step = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch._int_mm(torch.round(rows / step).to(torch.int8), weight.t()) * step * scale


def _int_mm(module: Int8Linear, rows: torch.Tensor) -> torch.Tensor:
    return int_mm(rows, module.weight, module.scale)


def _int8dot(module: Int8Linear, rows: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`int_mm` finished (``FINISHING``), bit for bit, in rinna-cli's own kernel (:mod:`rinna_cli.native`)."""
    return native.library().int8dot(rows, module.weight, module.scale, dtype, bias)


def _int8pack(dtype: torch.dtype):
    def kernel(module: Int8Linear, rows: torch.Tensor) -> torch.Tensor:
        """Weight-only int8 (``torch._weight_int8pack_mm``) with activations in ``dtype``."""
        scale = module.derived(f"scale:{dtype}", lambda: module.scale.to(dtype))
        return torch._weight_int8pack_mm(rows.to(dtype).contiguous(), module.weight, scale)

    return kernel


def _dequant(dtype: torch.dtype):
    def kernel(module: Int8Linear, rows: torch.Tensor) -> torch.Tensor:
        """The weights dequantized to ``dtype`` for this call, then a dense matmul (worth it for long prefills only)."""
        scale = module.derived(f"scale:{dtype}", lambda: module.scale.to(dtype))
        return rows.to(dtype) @ (module.weight.to(dtype) * scale[:, None]).t()

    return kernel


class Int8Linear(QuantLinear):
    """``y = x @ (q * scale).T + bias`` with int8 ``q`` of shape (out, in) and a float32 scale per output."""

    KERNELS = {
        "int_mm": _int_mm,
        "int8dot": _int8dot,
        "int8pack": _int8pack(torch.bfloat16),
        "int8pack_f32": _int8pack(torch.float32),
        "dequant": _dequant(torch.bfloat16),
    }
    PREFILL_ONLY = frozenset({"dequant"})  # dequantizing a whole matrix per call never pays for one row
    SAME_ROWS = frozenset({"int_mm", "int8dot"})
    FINISHING = frozenset({"int8dot"})
    # Until a plan is applied: the kernels that were fastest on the first CPU class measured (Zen 3).
    decode = batch = prefill = "int_mm"

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False)

    @classmethod
    def quantize(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module.weight.data, module.scale.data = quantize_weight(linear.weight.detach())
        if module.bias is not None:  # made with a bias exactly when linear has one
            module.bias.data = linear.bias.detach().to(ACTIVATION_DTYPE)
        return module

    def native_weights(self) -> native.Weights | None:
        return native.Weights(self.weight, self.scale, 0, self.bias) if self.decode == "int8dot" else None

    def tensors(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cache tensors of this layer, called ``name`` in the model, from its full-precision weight."""
        q, scale = quantize_weight(weight)
        return {f"{name}.weight": q, f"{name}.scale": scale}


def linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(qualified name, parent, attribute, module) of every ``nn.Linear``."""
    return [
        (f"{prefix}.{name}" if prefix else name, parent, name, child)
        for prefix, parent in model.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def quantize_model(model: nn.Module) -> nn.Module:
    """Replace every Linear in place, freeing each full-precision weight as soon as it is converted."""
    for _, parent, name, linear in linears(model):
        setattr(parent, name, Int8Linear.quantize(linear))
        linear.weight = None
    return model


def cache_key(folder: Path, format: str = FORMAT) -> str:
    """Identifies the weights: the format, the folder, and each weight file's name, size and modification time."""
    folder = folder.resolve()
    parts = [format, str(folder), (folder / "config.json").read_text(encoding="utf-8")]
    for path in sorted(folder.iterdir()):
        if path.suffix in (".safetensors", ".bin"):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


_ALIGN, PAD = 64, "__pad"
_DTYPE_NAMES = {torch.uint8: "U8", torch.int8: "I8", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


class SafetensorsWriter:
    """A safetensors file laid out up front, its tensors written as they come (any order), renamed into place.

    ``safetensors.torch.save_file`` wants every tensor at once and copies them all into a
    bytes object; here a first start holds one layer's tensors at a time, whatever the
    size of the model. Every tensor starts at a 64-byte boundary of the file (small
    ``__pad`` tensors fill the gaps), so memory-mapped it is aligned as torch's int8 and
    int4 kernels need and is used in place, never copied.
    """

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], format: str = FORMAT):
        self.path, self.specs = path, specs
        self.offsets: dict[str, int] = {}
        header: dict[str, dict[str, object]] = {"__metadata__": {"format": format}}
        offset = 0
        for name, (dtype, shape) in specs.items():
            gap = -offset % _ALIGN
            if gap:
                header[f"{PAD}{len(header)}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
                offset += gap
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.offsets[name] = offset
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-(8 + len(encoded)) % _ALIGN)
        self.start, self.size = 8 + len(encoded), offset
        self.head = struct.pack("<Q", len(encoded)) + encoded
        self.written: set[str] = set()
        self.temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def __enter__(self) -> SafetensorsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write(self.head, 0)
            os.ftruncate(self.fd, self.start + self.size)
        except BaseException:
            os.close(self.fd)
            self.temporary.unlink(missing_ok=True)
            raise
        return self

    def missing(self) -> list[str]:
        """The tensors of the layout not written yet."""
        return [name for name in self.specs if name not in self.written]

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` where the layout put ``name``, a float one converted to the layout's dtype a slice at a
        time (a whole float32 copy of rinna's embedding would be 0.36 GB); another shape is refused."""
        if name not in self.specs:
            raise ValueError(f"{name} is not one of the model's tensors")
        dtype, shape = self.specs[name]
        floats = tensor.is_floating_point() and dtype.is_floating_point
        if tuple(tensor.shape) != shape or (tensor.dtype != dtype and not floats):
            raise ValueError(f"{name} is {tensor.dtype} {tuple(tensor.shape)} where the model wants {dtype} {shape}")
        flat, step, at = tensor.detach().reshape(-1), 2**22, self.start + self.offsets[name]
        for start in range(0, flat.numel(), step):
            piece = flat[start : start + step].to(dtype).contiguous()
            self._write(memoryview(piece.view(torch.uint8).numpy()), at + start * dtype.itemsize)
        self.written.add(name)

    def _write(self, data: bytes | memoryview, position: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            done = os.pwrite(self.fd, view, position)
            view, position = view[done:], position + done

    def __exit__(self, kind, error, trace) -> None:
        os.close(self.fd)
        try:
            if kind is None:
                if self.missing():
                    raise ValueError(f"{len(self.missing())} tensors were never written (e.g. {self.missing()[0]})")
                os.replace(self.temporary, self.path)
        finally:
            self.temporary.unlink(missing_ok=True)


def meta_model(config, choose: Callable[[str, nn.Linear], QuantLinear] | None = None) -> nn.Module:
    """The model on the meta device with each Linear replaced by ``choose(name, linear)`` (default: Int8Linear)."""
    from transformers import AutoModelForCausalLM

    choose = choose or (lambda _, lin: Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, "meta"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=ACTIVATION_DTYPE)
    for name, parent, attribute, linear in linears(model):
        setattr(parent, attribute, choose(name, linear))
    return model


def quantize_checkpoint(files: list[Path], config, path: Path) -> None:
    """Quantize checkpoint files (safetensors or pickles) to int8 into the cache, a layer at a time."""
    from rinna_cli.checkpoint import quantize_into

    quantize_into(files, meta_model(config), path, FORMAT)


def load(config, path: Path, model: nn.Module | None = None) -> nn.Module:
    """Build the model on the meta device (or take ``model``, so built) and take the cached tensors as they are."""
    model = model if model is not None else meta_model(config)
    # torch's int8 kernel crashes on operands that are not 64-byte aligned: the cache is
    # written aligned, and anything that is not (an older or foreign file) is copied.
    state = {
        key: value if value.data_ptr() % _ALIGN == 0 else value.clone()
        for key, value in load_file(str(path)).items()
        if not key.startswith(PAD)
    }
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"the quantized cache does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    _rebuild_buffers(model, config)
    model.eval()
    return model


def _rebuild_buffers(model: nn.Module, config) -> None:
    """Non-persistent buffers (the rotary frequencies) are not in the cache: make them again on the CPU."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if any(buffer.is_meta for buffer in child.buffers(recurse=False)):
                with torch.device("cpu"):
                    setattr(parent, name, type(child)(config=config))
    leftovers = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftovers:
        raise ValueError(f"the quantized cache does not fit the model ({leftovers[0]} missing)")
