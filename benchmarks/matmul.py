"""One weight matrix, out of cache, through each CPU kernel: ms per call at 1, 2, 4, 8 and 48 rows.

``python benchmarks/matmul.py [OUT IN]`` (default 11264 2816, rinna's MLP input): 8 copies of the matrix
(more than an L3 cache) are cycled, best of 3 passes; relative errors against float32 first. The
candidates are the project's own kernels (``Int8Linear.KERNELS``, ``Int4Linear.KERNELS``; not the float32-activation
ones, minutes per call on CPUs without BF16, nor per-call dequantizing) and oneDNN bfloat16 dense, which it does not
use. (``onednn::qlinear_pointwise`` on prepacked int8 weights was measured here too: 370 ms for one row on Zen 5.)
"""

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rinna_cli.int4 import Int4Linear  # noqa: E402
from rinna_cli.int8 import Int8Linear  # noqa: E402

COPIES, ROWS = 8, (1, 2, 4, 8, 48)


def main(out_features: int, in_features: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    linears = [nn.Linear(in_features, out_features, bias=False) for _ in range(COPIES)]
    int8 = [Int8Linear.quantize(linear) for linear in linears]
    int4 = [Int4Linear.quantize(linear) for linear in linears]
    dense = [linear.weight.detach().to(torch.bfloat16) for linear in linears]
    def by(name: str):  # the layer's output by that kernel, as a model runs it (float32 in and out)
        return lambda module, x: module.output(name, x, torch.float32)

    candidates = {name: (by(name), int8) for name in ("int_mm", "int8dot", "int8pack")}
    candidates |= {name: (by(name), int4) for name in ("int4dot", "int4pack")}
    candidates["bf16 dense"] = (lambda weight, x: nn.functional.linear(x.to(torch.bfloat16), weight), dense)

    x = torch.randn(3, in_features)
    want = linears[0](x)
    with torch.inference_mode():
        for name, (kernel, weights) in candidates.items():
            got = kernel(weights[0], x).float()
            print(f"{name}: relative error {((got - want).norm() / want.norm()).item():.4f}")
        print(f"{out_features} x {in_features}, ms per matrix at rows {ROWS}")
        for name, (kernel, weights) in candidates.items():
            print(
                f"{name:16s}",
                "  ".join(f"{_time(kernel, weights, rows, in_features):7.2f}" for rows in ROWS),
                flush=True,
            )


def _time(kernel, weights, rows: int, in_features: int) -> float:
    x = torch.randn(rows, in_features)
    for weight in weights:
        kernel(weight, x)
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        for weight in weights:
            kernel(weight, x)
        best = min(best, (time.perf_counter() - began) / len(weights))
    return best * 1000


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (11264, 2816))
