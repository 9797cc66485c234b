"""One weight matrix, out of cache, through each CPU kernel: ms per call at 1, 2, 4, 8 and 48 rows.

``python benchmarks/matmul.py [OUT IN]`` (default 11264 2816, rinna's MLP input): 8 copies of the matrix
(more than an L3 cache) are cycled, best of 3 passes; relative errors against float32 first.
"""
import sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.manual_seed(0)
torch.set_num_threads(2)
N, K = int(sys.argv[1]) if len(sys.argv) > 1 else 11264, int(sys.argv[2]) if len(sys.argv) > 2 else 2816
COPIES = 8
rows_list = [1, 2, 4, 8, 48]
w = [torch.randn(N, K) * 0.02 for _ in range(COPIES)]
q = []; s = []
for m in w:
    sc = m.abs().amax(1).clamp(min=1e-8) / 127
    q.append(torch.round(m / sc[:, None]).to(torch.int8)); s.append(sc)
def bench(name, fn, rows):
    x = torch.randn(rows, K)
    with torch.inference_mode():
        for i in range(COPIES): fn(i, x)
        best = 1e9
        for r in range(3):
            t = time.perf_counter()
            for i in range(COPIES): fn(i, x)
            best = min(best, (time.perf_counter() - t) / COPIES)
    return best * 1000
# candidates
def int_mm(i, x):
    step = x.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
    return torch._int_mm(torch.round(x / step).to(torch.int8), q[i].t()) * step * s[i]
sb = [t.to(torch.bfloat16) for t in s]
def int8pack(i, x):
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), q[i], sb[i])
wb = [m.to(torch.bfloat16) for m in w]
def bf16(i, x):
    return torch.nn.functional.linear(x.to(torch.bfloat16), wb[i])
packed = None
try:
    packed = [torch.ops.onednn.qlinear_prepack(qq, None) for qq in q]
    zp = torch.zeros(N, dtype=torch.int64)
    def onednn_s8(i, x):
        step = x.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        qx = torch.round(x / step).to(torch.int8)
        # per-token scale folded after: x_scale=1
        y = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 0, packed[i], s[i], zp, None, 1.0, 0, torch.float32, "none", [], "")
        return y * step
    def onednn_u8(i, x):
        step = x.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        qx = (torch.round(x / step) + 128).to(torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, packed[i], s[i], zp, None, 1.0, 0, torch.float32, "none", [], "")
        return y * step
    def onednn_u8_bf16out(i, x):
        step = x.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        qx = (torch.round(x / step) + 128).to(torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, packed[i], s[i], zp, None, 1.0, 0, torch.bfloat16, "none", [], "")
        return y * step
except Exception as e:
    print("onednn prepack failed", e)
# int4
try:
    from rinna_cli.int4 import quantize_weight as q4
    p4 = [q4(m, 128) for m in w]
    def int4(i, x):
        return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), p4[i][0], 128, p4[i][1])
except Exception as e:
    print("int4 failed", e); int4 = None
cands = {"int_mm": int_mm, "int8pack_bf16": int8pack, "bf16_dense": bf16}
if packed: cands.update(onednn_s8=onednn_s8, onednn_u8=onednn_u8, onednn_u8_bf16out=onednn_u8_bf16out)
if int4: cands["int4pack"] = int4
# check correctness
x = torch.randn(3, K)
ref = x @ w[0].t()
for n, f in cands.items():
    try:
        with torch.inference_mode(): y = f(0, x).float()
        print(f"{n}: rel err {((y-ref).norm()/ref.norm()).item():.4f}")
    except Exception as e:
        print(n, "ERR", str(e)[:200])
print("shape", N, K, "ms per matrix; rows:", rows_list)
for n, f in cands.items():
    try:
        print(f"{n:20s}", "  ".join(f"{bench(n, f, r):7.2f}" for r in rows_list), flush=True)
    except Exception as e:
        print(n, "ERR", str(e)[:200])
