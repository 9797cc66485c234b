"""Decode speed as a conversation grows: torch's SDPA against rinna-cli's attention (``attend.c``), one process.

``python benchmarks/context.py [--scheme int4] [--contexts 50 500 1500] [--rounds 2] [--layers 36]``: the
benchmark model (benchmarks/model.py) quantized as ``--scheme`` (the cache of benchmarks/cpu.py, its plan
measured on first use), then for each context length a greedy reply of 17 tokens after a prompt of that many
tokens, with each attention in turn (interleaved, ``--rounds`` times), in the plan's activation dtype or
``--activation``'s (the plan's kernels, that dtype). Also one
layer's decode attention alone over 8 layers' caches (more than an L3 cache), µs per layer. Prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import model as bench_model  # noqa: E402


def layer_us(library, dtype: torch.dtype, tokens: int, heads: int, size: int) -> dict[str, float]:
    """µs per layer of one query's attention over ``tokens`` cached tokens, each implementation, best of 3."""
    caches = [torch.randn(2, 1, heads, tokens, size).to(dtype) for _ in range(8)]
    query = torch.randn(1, heads, 1, size).to(dtype)
    scale = size**-0.5
    runs = {
        "sdpa": lambda k, v: F.scaled_dot_product_attention(query, k, v, scale=scale),
        "attend": lambda k, v: library.attend(query, k, v, scale),
    }
    best = {name: float("inf") for name in runs}
    for _ in range(3):
        for name, run in runs.items():
            began = time.perf_counter()
            for cache in caches:
                run(cache[0], cache[1])
            best[name] = min(best[name], (time.perf_counter() - began) / len(caches) * 1e6)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="int4", choices=("int8", "int4"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[50, 500, 1500])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activation", choices=("float32", "bfloat16"), help="instead of the plan's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoConfig

    from rinna_cli import attention, kernels, native
    from rinna_cli.contract import Sampling
    from rinna_cli.engine import Engine
    from rinna_cli.quantized import load_quantized
    from rinna_cli.tokenizer import Tokenizer

    folder = bench_model.build(args.layers)
    config = AutoConfig.from_pretrained(folder)
    model, plan = load_quantized(folder, [folder / "model.safetensors"], config,
                                 bench_model.cache_root() / "cpu-cache", args.scheme)  # fmt: skip
    model.eval()
    if args.activation:
        plan = dataclasses.replace(plan, activation=args.activation)
        kernels.apply(model, plan)
    cpu, _ = kernels.cpu_identity()
    print(f"{cpu}, {args.threads} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; plan: {plan.describe()}")
    engine = Engine(model, Tokenizer.from_folder(folder), "bench", 4096)
    heads, size = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    dtype = kernels.ACTIVATIONS[plan.activation]
    rates: dict[tuple[int, str], list[float]] = {}
    firsts: dict[int, list[float]] = {}
    for _ in range(args.rounds):
        for tokens in args.contexts:
            prompt = [1000 + i % 3000 for i in range(tokens)]
            for implementation in kernels.ATTENTIONS:
                attention.use(model, implementation)
                engine.forget()
                reply = engine.generate(prompt, Sampling(0.0, 1.0, 0, 1.0, 17, 0))
                rates.setdefault((tokens, implementation), []).append(reply.tokens_per_s)
                firsts.setdefault(tokens, []).append(reply.ttft_s)  # a prompt is SDPA's either way
    kernels.apply(model, plan)
    print(f"| context tokens | first token s | decode tok/s, SDPA | decode tok/s, attend | ×, per round | "
          f"one layer's attention µs, SDPA / attend ({plan.activation}) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for tokens in args.contexts:
        sdpa, attend = rates[(tokens, "sdpa")], rates[(tokens, "attend")]
        us = layer_us(native.library(), dtype, tokens, heads, size)
        first = f"{min(firsts[tokens]):.2f}–{max(firsts[tokens]):.2f}"
        print(f"| {tokens} | {first} | {', '.join(f'{r:.2f}' for r in sdpa)} | {', '.join(f'{r:.2f}' for r in attend)} | "
              f"{', '.join(f'×{a / s:.2f}' for s, a in zip(sdpa, attend))} | {us['sdpa']:.0f} / {us['attend']:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
