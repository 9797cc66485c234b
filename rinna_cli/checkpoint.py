"""Checkpoint tensors read a layer at a time, from safetensors files or ``pytorch_model*.bin`` pickles.

Quantizing must never hold the full-precision model: rinna's 3.6 B parameters are
7.2 GB in float16. Each layer's tensors are taken from a memory mapping of their own
that is closed before the next layer is read, and its quantized tensors are written to
the cache file at once, so resident memory holds about one layer. A pickle is read with
torch's ``weights_only`` loader (plain tensors only, never code) and ``mmap=True``,
which maps the file and reads a tensor's bytes only when it is used; the mapping is
dropped with the last tensor of the layer.
The heap freed by each layer's temporaries is given back to the system before the next.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

_LAYER = re.compile(r"^(.*?layers\.\d+)\.")


def model_name(key: str) -> str:
    """The model's name for a checkpoint tensor: rinna's checkpoints call the output head ``embed_out``."""
    return re.sub(r"^embed_out\.", "lm_head.", key)


def _group(name: str) -> str:
    """Tensors read together: a transformer layer's, or a top-level module's."""
    match = _LAYER.match(name)
    return match.group(1) if match else name.rsplit(".", 1)[0]


def _pickle(file: Path, unmappable: dict[Path, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The pickle's state dict, mapped; one that cannot be mapped is read whole once and kept in ``unmappable``."""
    if file in unmappable:
        return unmappable[file]
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:  # an old (pre-zip) pickle cannot be mapped
        if "mmap" not in str(err):
            raise
        unmappable[file] = torch.load(file, map_location="cpu", weights_only=True)
        return unmappable[file]


def _keys(file: Path, unmappable: dict[Path, dict[str, torch.Tensor]]) -> list[str]:
    if file.suffix == ".safetensors":
        with safe_open(str(file), "pt") as checkpoint:
            return list(checkpoint.keys())
    state = _pickle(file, unmappable)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file.name} does not hold a state dict of tensors")
    return list(state)


def layers(files: list[Path], wanted: set[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The checkpoint's tensors that the model wants (by model name), one group (layer) at a time.

    Each dict is only valid until the next one is asked for: its tensors may be views
    into a mapping that is then released. Copy what you keep.
    """
    groups: dict[tuple[Path, str], list[str]] = {}
    unmappable: dict[Path, dict[str, torch.Tensor]] = {}
    for file in files:
        for key in _keys(file, unmappable):
            if model_name(key) in wanted:
                groups.setdefault((file, _group(model_name(key))), []).append(key)
    for (file, _), keys in groups.items():
        if file.suffix == ".safetensors":
            with safe_open(str(file), "pt") as checkpoint:
                yield {model_name(key): checkpoint.get_tensor(key) for key in keys}
        else:
            state = _pickle(file, unmappable)
            group = {model_name(key): state[key] for key in keys}
            del state
            yield group


def quantize_into(files: list[Path], model: nn.Module, path: Path, format: str) -> None:
    """Quantize the checkpoint into a cache file for ``model`` (built on the meta device), a layer at a time.

    A weight whose module has ``tensors(name, weight)`` (a quantized linear layer) is stored
    as that method returns; every other tensor the model holds as float32. Each layer is
    written as soon as it is quantized, so memory holds one layer, not the cache.
    """
    from rinna_cli.int8 import PAD, SafetensorsWriter

    modules = dict(model.named_modules())
    quantized = {f"{name}.weight": module for name, module in modules.items() if hasattr(module, "tensors")}
    specs = {key: (t.dtype, tuple(t.shape)) for key, t in model.state_dict().items() if not key.startswith(PAD)}
    with SafetensorsWriter(path, specs, format) as writer:
        for group in layers(files, set(specs) | set(quantized)):
            for name, tensor in group.items():
                if name in quantized:
                    for key, value in quantized[name].tensors(name.removesuffix(".weight"), tensor).items():
                        writer.put(key, value)
                else:
                    writer.put(name, tensor)  # as float32, the model's dtype
            group.clear()
            return_freed_memory()
        missing = writer.missing()
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} of the model's tensors (e.g. {missing[0]})")


def return_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it resident otherwise).

    Quantizing a layer frees hundreds of MB of temporaries in blocks below glibc's mmap
    threshold: kept, they added 0.1 GB per layer of a full-width model (Zen 5, int8), and on
    rinna 2.9 GB stayed after the quantized tensors were freed, before the cache is mapped.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
