"""A random-weight model folder of rinna's exact shape, built once and cached outside the repository.

``rinna/japanese-gpt-neox-3.6b-instruction-sft`` has 36 layers; ``layers`` builds the
same model with fewer (for quick runs). The folder holds what rinna's hub repository
holds: config.json (transformers 4.x keys), float16 ``model.safetensors`` (the output
head named ``embed_out.weight`` as in rinna's files; transformers 5 renames it to
``lm_head`` on load), ``spiece.model`` with exactly 32000 pieces, tokenizer_config.json
and special_tokens_map.json.

The weights are streamed to the safetensors file one tensor at a time (the names and
shapes come from the model built on the meta device), so building the 7.2 GB file
never holds more than one tensor in memory. The folder is written under a temporary
name and renamed when complete; an existing folder is reused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.script import MESSAGES  # noqa: E402
from tests.fixtures.models import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, train_spm  # noqa: E402

FORMAT = "v1"  # bump when the folder's contents change, so that old caches are not reused
FULL_LAYERS = 36
VOCAB_SIZE = 32000

RINNA_CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 2816,
    "num_hidden_layers": FULL_LAYERS,
    "num_attention_heads": 22,
    "intermediate_size": 11264,
    "hidden_act": "gelu",
    "rotary_pct": 1.0,
    "rotary_emb_base": 10000,
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-05,
    "use_parallel_residual": False,
    "tie_word_embeddings": False,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "torch_dtype": "float16",
    "initializer_range": 0.02,
    "use_cache": True,
    "transformers_version": "4.26.0",
}

# transformers 5 calls rinna's output head lm_head; rinna's checkpoint (and transformers 4) embed_out.
CHECKPOINT_NAMES = {"lm_head.weight": "embed_out.weight"}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "rinna-cli-bench"


def folder_for(layers: int, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"rinna-3.6b-shape-{layers}L-{FORMAT}"


def _train(lines: list[str], padding: int) -> bytes:
    """rinna's sentencepiece options plus ``padding`` filler pieces."""
    return train_spm(lines, VOCAB_SIZE, tuple(f"<x{i}>" for i in range(padding)))


def build_tokenizer() -> bytes:
    """A rinna-style tokenizer with exactly 32000 pieces (the random model may emit any id below 32000)."""
    import sentencepiece as spm

    from tests.fixtures.models import TINY_CORPUS

    lines = list(TINY_CORPUS) + list(MESSAGES)
    padding = 0
    for _ in range(10):
        data = _train(lines, padding)
        size = spm.SentencePieceProcessor(model_proto=data).get_piece_size()
        if size == VOCAB_SIZE:
            return data
        padding += VOCAB_SIZE - size
        if padding < 0:
            raise RuntimeError(f"the tokenizer has {size} pieces without padding, more than {VOCAB_SIZE}")
    raise RuntimeError(f"could not train a tokenizer of exactly {VOCAB_SIZE} pieces (last: {size})")


def config_dict(layers: int) -> dict:
    return {**RINNA_CONFIG, "num_hidden_layers": layers}


def _tensor_specs(folder: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(checkpoint name, shape) of every tensor of the model in ``folder``/config.json, from a meta-device build."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(CHECKPOINT_NAMES.get(name, name), tuple(t.shape)) for name, t in model.state_dict().items()]


def _fill(name: str, shape: tuple[int, ...], seed: int):
    """The value of one tensor: layer norm weights 1, biases 0, everything else N(0, 0.02) in float16."""
    import torch

    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if "layernorm" in name or "layer_norm" in name:
        return torch.ones(shape, dtype=torch.float16)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=torch.float32, generator=generator).mul_(0.02).to(torch.float16)


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> int:
    """Write the float16 tensors of ``specs`` to ``path`` one at a time; return the file size."""
    header: dict = {}
    offset = 0
    for name, shape in specs:
        size = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for index, (name, shape) in enumerate(specs):
            tensor = _fill(name, shape, seed * 100_003 + index)
            file.write(memoryview(tensor.view(-1).numpy()).cast("B"))
    return 8 + len(encoded) + offset


def _check(folder: Path, specs: list[tuple[str, tuple[int, ...]]], load: bool) -> None:
    """The file holds exactly ``specs``; with ``load``, transformers loads it with no missing or unexpected keys."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
        stored = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    if stored != dict(specs):
        raise RuntimeError(f"{folder}: model.safetensors does not hold the model's tensors")
    if load:
        import torch
        from transformers import AutoModelForCausalLM

        _, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, output_loading_info=True)
        bad = {key: value for key, value in info.items() if value and key in ("missing_keys", "unexpected_keys")}
        if bad:
            raise RuntimeError(f"{folder}: transformers does not load the weights cleanly: {bad}")


def build(layers: int = FULL_LAYERS, root: Path | None = None, log=print) -> Path:
    """The cached folder for ``layers`` layers, built now if absent."""
    folder = folder_for(layers, root)
    if (folder / "model.safetensors").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        (temporary / "config.json").write_text(json.dumps(config_dict(layers), indent=2) + "\n", encoding="utf-8")
        (temporary / "spiece.model").write_bytes(build_tokenizer())
        (temporary / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        (temporary / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
        specs = _tensor_specs(temporary)
        size = sum(math.prod(shape) * 2 for _, shape in specs)
        log(f"writing {size / 1e9:.2f} GB of random float16 weights ({layers} layers) to {folder}")
        write_safetensors(temporary / "model.safetensors", specs)
        _check(temporary, specs, load=layers <= 8)
        try:
            os.rename(temporary, folder)
        except OSError:  # another run finished first: keep its folder
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=FULL_LAYERS)
    print(build(parser.parse_args().layers))
