"""Decode steps of the full-size model, two variants alternating in one process: a change's effect on a noisy host.

``python benchmarks/paired.py [--scheme int4] [--rounds 6] --against-unfused`` times DecodeLayer with and without
decode.c's fused attention half; ``--against-build OLD.so`` times the kernels of another build of rinna-cli's C
sources against this checkout's (e.g. this checkout's ``rinna_cli/*.c`` and ``native.h`` copied into ``old/``, then
``git show REV:rinna_cli/int4dot.c > old/int4dot.c`` and ``cc -O3 -march=native -fopenmp -shared -fPIC old/*.c -o
old.so``). Each round prefills ``--context`` tokens (50) and times ``--steps`` decode steps of A then of B (median
per round); the host's noise falls on both alike, which separate runs of ``benchmarks/cpu.py`` cannot promise. Also
says whether A and B gave the same logits (a change to ``attend.c`` changes its sums' order, so not the same bits).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.model import build  # noqa: E402
from rinna_cli import attention, native  # noqa: E402
from rinna_cli.engine import Engine, _GrowingCache  # noqa: E402
from rinna_cli.tokenizer import Tokenizer  # noqa: E402


def steps(model, count: int, context: int) -> tuple[float, torch.Tensor]:
    """The median time of ``count`` greedy decode steps after a prompt of ``context`` tokens, and their logits."""
    cache, times, logits = _GrowingCache(), [], []
    out = model(torch.tensor([[100 + i % 1000 for i in range(context)]]), cache=cache, use_cache=True)
    for _ in range(count):
        began = time.perf_counter()
        out = model(out.logits[:, -1].argmax(-1, keepdim=True), cache=cache, use_cache=True)
        times.append(time.perf_counter() - began)
        logits.append(out.logits[:, -1])
    return statistics.median(times), torch.cat(logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="int4", choices=("int8", "int4"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--context", type=int, default=50, help="prompt tokens before the decode steps")
    against = parser.add_mutually_exclusive_group(required=True)
    against.add_argument("--against-unfused", action="store_true", help="A: DecodeLayer without decode.c")
    against.add_argument("--against-build", type=Path, help="A: the kernels of this shared library")
    args = parser.parse_args()
    folder = build(log=lambda message: print(message, file=sys.stderr))
    engine = Engine.load(folder, folder.name, Tokenizer.from_folder(folder), quantize=args.scheme)
    print(f"{args.scheme}: {engine.kernels}")
    current, fused = native.library(), attention.DecodeLayer._fused
    old = native.Library(args.against_build) if args.against_build else current
    medians: dict[str, list[float]] = {"A": [], "B": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            seen = {}
            for name in medians:
                native.library = (lambda: old) if name == "A" else (lambda: current)
                unfused = name == "A" and args.against_unfused
                attention.DecodeLayer._fused = (lambda *_: None) if unfused else fused
                median, seen[name] = steps(engine.model, args.steps, args.context)
                medians[name].append(median)
            same = torch.equal(seen["A"], seen["B"])
            print(f"A {medians['A'][-1] * 1e3:.1f} ms, B {medians['B'][-1] * 1e3:.1f} ms a step; same logits: {same}")
    ratios = " ".join(f"{b / a:.3f}" for a, b in zip(medians["A"], medians["B"]))
    print(f"median A {statistics.median(medians['A']) * 1e3:.1f} ms, B {statistics.median(medians['B']) * 1e3:.1f} ms;"
          f" B/A per round {ratios}")  # fmt: skip


if __name__ == "__main__":
    main()
