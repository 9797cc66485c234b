"""int8 weights for the CPU: quantize once, cache on disk, load the cache directly.

Every ``nn.Linear`` (attention, MLP and the output head, 97 % of rinna's
parameters) becomes an :class:`Int8Linear`: int8 weights with one scale per
output channel (symmetric, absmax). Embeddings and layer norms are kept in
float32. The quantized state dict is written once to a safetensors file in
the cache directory, keyed by the model's files, and later starts build the
model on the meta device and take the cached tensors as they are, so the
full-precision weights are never read again.

Imported only by :mod:`rinna_cli.engine`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

FORMAT = "rinna-cli-int8-v3"
# Activations, embeddings, layer norms and the KV cache: float32, since this CPU class has no
# native bfloat16 arithmetic (attention over a 600-token cache runs twice as fast in float32).
ACTIVATION_DTYPE = torch.float32


def _runs(kernel: str) -> bool:
    try:
        Int8Linear(32, 8, False, kernel=kernel).forward(torch.zeros(1, 32, dtype=ACTIVATION_DTYPE))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 with one float32 scale per output channel (row)."""
    scale = weight.abs().amax(dim=1).float().clamp(min=1e-8) / 127.0
    rows = []
    for start in range(0, weight.shape[0], 1024):  # in slices: no float32 copy of a whole matrix
        block = weight[start : start + 1024].float() / scale[start : start + 1024, None]
        rows.append(torch.round(block).clamp(-127, 127).to(torch.int8))
    return torch.cat(rows), scale


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with int8 ``q`` of shape (out, in) and a scale per output.

    Kernels, picked by measurement (docs/benchmarks.md): ``int_mm`` quantizes each row
    of ``x`` to int8 on the fly (absmax, one scale per token) and multiplies int8 by int8
    with torch's ``_int_mm`` (int32 sums), near the memory-bandwidth bound when decoding
    and 5x faster than ``int8pack`` when prefilling; ``int8pack`` (torch's weight-only
    int8 matmul, bfloat16 activations) is the fallback where ``_int_mm`` does not run.
    """

    kernel = "int_mm"

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, kernel: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if kernel:
            self.kernel = kernel
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=ACTIVATION_DTYPE, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def quantize(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module.weight.data, module.scale.data = quantize_weight(linear.weight.detach())
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().to(ACTIVATION_DTYPE)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "int_mm":
            rows = rows.float()
            step = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
            y = torch._int_mm(torch.round(rows / step).to(torch.int8), self.weight.t()) * step * self.scale
        else:
            y = torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight, self.scale.to(torch.bfloat16))
        y = y.to(ACTIVATION_DTYPE)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


KERNELS = ("int_mm", "int8pack")


def best_kernel() -> str:
    """The first kernel of :data:`KERNELS` that runs on this machine."""
    return next((kernel for kernel in KERNELS if _runs(kernel)), KERNELS[-1])


Int8Linear.kernel = best_kernel()


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def quantize_model(model: nn.Module) -> nn.Module:
    """Replace every Linear in place, freeing each full-precision weight as soon as it is converted."""
    for parent, name, linear in _linears(model):
        setattr(parent, name, Int8Linear.quantize(linear))
        linear.weight = None
    return model


def cache_key(folder: Path) -> str:
    """Identifies the weights: the folder, and each weight file's name, size and modification time."""
    folder = folder.resolve()
    parts = [FORMAT, str(folder), (folder / "config.json").read_text(encoding="utf-8")]
    for path in sorted(folder.iterdir()):
        if path.suffix in (".safetensors", ".bin"):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def save(model: nn.Module, path: Path) -> None:
    """Write the quantized model's state dict to the cache."""
    write_safetensors(path, model.state_dict())


_ALIGN, _PAD = 64, "__pad"
_DTYPE_NAMES = {torch.uint8: "U8", torch.int8: "I8", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor, atomically (temporary file, then rename).

    ``safetensors.torch.save_file`` first copies every tensor into a bytes object, which
    would double the memory of a 3.6 GB model at its peak. Here every tensor starts at a
    64-byte boundary of the file (small ``__pad`` tensors fill the gaps), so memory-mapped
    it is aligned as torch's int8 kernel needs and is used in place, never copied.
    """
    entries, offset = [], 0
    for name, tensor in tensors.items():
        gap = -offset % _ALIGN
        if gap:
            entries.append((f"{_PAD}{len(entries)}", torch.zeros(gap, dtype=torch.uint8)))
            offset += gap
        entries.append((name, tensor.detach().contiguous()))
        offset += tensor.numel() * tensor.element_size()
    header, offset = {"__metadata__": {"format": FORMAT}}, 0
    for name, tensor in entries:
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % _ALIGN)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)) + encoded)
            for _, tensor in entries:
                file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=ACTIVATION_DTYPE)
    for parent, name, linear in _linears(model):
        setattr(parent, name, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, "meta"))
    return model


def _checkpoint_name(key: str) -> str:
    """The model's name for a checkpoint tensor: rinna's checkpoints call the output head ``embed_out``."""
    return re.sub(r"^embed_out\.", "lm_head.", key)


def quantize_checkpoint(files: list[Path], config, path: Path) -> None:
    """Quantize safetensors checkpoint files into the cache, one layer at a time.

    Each layer's tensors are read through a mapping of their own that is closed
    before the next layer, so memory holds the int8 result and one layer, never
    the full-precision model (peak about 4 GB for rinna's 3.6 B parameters).
    """
    model = _meta_model(config)
    quantized = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Int8Linear)}
    wanted = set(model.state_dict())
    groups: dict[tuple[Path, str], list[str]] = {}
    for file in files:
        with safe_open(str(file), "pt") as checkpoint:
            for key in checkpoint.keys():
                if _checkpoint_name(key) in wanted or _checkpoint_name(key) in quantized:
                    groups.setdefault((file, re.sub(r"\.[^.]+$", "", _checkpoint_name(key))), []).append(key)
    state: dict[str, torch.Tensor] = {}
    for (file, _), keys in groups.items():
        with safe_open(str(file), "pt") as checkpoint:
            for key in keys:
                name, tensor = _checkpoint_name(key), checkpoint.get_tensor(key)
                if name in quantized:
                    weight, scale = quantize_weight(tensor)
                    state[name], state[name.removesuffix("weight") + "scale"] = weight, scale
                else:
                    state[name] = tensor.to(ACTIVATION_DTYPE).clone()
                del tensor
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} of the model's tensors (e.g. {missing[0]})")
    write_safetensors(path, state)


def load(config, path: Path) -> nn.Module:
    """Build the model on the meta device with Int8Linear layers and take the cached tensors as they are."""
    model = _meta_model(config)
    # torch's int8 kernel crashes on operands that are not 64-byte aligned: the cache is
    # written aligned, and anything that is not (an older or foreign file) is copied.
    state = {
        key: value if value.data_ptr() % _ALIGN == 0 else value.clone()
        for key, value in load_file(str(path)).items()
        if not key.startswith(_PAD)
    }
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"the int8 cache does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
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
        raise ValueError(f"the int8 cache does not fit the model ({leftovers[0]} missing)")

