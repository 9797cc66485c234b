"""rinna-cli's own kernels on every path they can build: int8dot gives int_mm's very outputs, int4dot the int4
weights' product with per-group int8 activations, each row alone as in a batch, attend a decode step's attention;
none without a compiler."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rinna_cli import int4, int8, kernels, native

FLAGS = set(kernels.cpu_identity()[1].split())
# -march values for each path of int8dot.c and int4dot.c, and what this CPU needs to run their code
MARCHES = {
    "native": set(),
    "x86-64-v3": {"avx2", "fma", "bmi2"},  # the AVX2 path
    "x86-64": set(),  # plain C
}
SHAPES = [(96, 256), (33, 100), (7, 65), (16, 2816), (40, 11264)]  # odd outputs, inputs not a multiple of 64 or 16


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, native.Library]:
    folder = tmp_path_factory.mktemp("native")
    return {march: native.Library(native.build(folder, march)) for march, needs in MARCHES.items() if needs <= FLAGS}


@pytest.fixture(params=list(MARCHES))
def path(built, request) -> tuple[str, native.Library]:
    """Each -march this CPU runs, and its build."""
    if request.param not in built:
        pytest.skip(f"this CPU cannot run -march={request.param} code")
    return request.param, built[request.param]


def test_every_path_gives_int_mms_outputs_bit_for_bit(path):
    march, library = path
    torch.manual_seed(3)
    for rows in (1, 2, 5, 8, 9, 17):
        for out_features, in_features in SHAPES:
            x = torch.randn(rows, in_features) * torch.logspace(-3, 2, rows)[:, None]
            w, scale = int8.quantize_weight(torch.randn(out_features, in_features))
            got, want = library.int8dot(x, w, scale), int8.int_mm(x, w, scale)
            assert got.dtype == torch.float32 and torch.equal(got, want), (march, rows, out_features, in_features)
    # ties round to even as torch.round does, an all-zero row is clamped, the largest sums do not overflow
    ties = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5], [0.0] * 8, [-127.0] * 8])
    ones = torch.tensor([1.0] * 3)
    assert torch.equal(library.int8dot(ties, torch.tensor([[1] * 8, [-127] * 8, [127] * 8], dtype=torch.int8), ones),
                       int8.int_mm(ties, torch.tensor([[1] * 8, [-127] * 8, [127] * 8], dtype=torch.int8), ones))  # fmt: skip
    most = torch.full((2, 4096), -127, dtype=torch.int8)
    got = library.int8dot(torch.full((1, 4096), -1.0), most, torch.ones(2))  # sums of 127 * 127 * 4096
    assert torch.equal(got, int8.int_mm(torch.full((1, 4096), -1.0), most, torch.ones(2)))
    assert got.tolist() == [[pytest.approx(127.0 * 4096)] * 2]


def int4_reference(x: torch.Tensor, codes: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """What int4dot computes, in float64: x quantized to int8 per group (its step in float32, as the kernel's), times
    the dequantized weights (``pairs``: scale and zero per row and group)."""
    out_features, in_features = codes.shape
    group = in_features // pairs.shape[1]
    groups = x.float().reshape(x.shape[0], -1, group)
    step = groups.abs().amax(dim=2, keepdim=True).clamp(min=1e-8) / 127
    rows = (torch.round(groups / step).double() * step.double()).reshape(x.shape[0], in_features)
    weight = (codes.double().reshape(out_features, -1, group) - 8) * pairs[..., :1].double() + pairs[..., 1:].double()
    return rows @ weight.reshape(out_features, in_features).T


def test_int4dot_on_every_path_is_the_int4_product_and_each_row_as_if_alone(path):
    """One kernel for a decode step, a batch and a prompt (more rows than one pass takes, its codes unpacked once):
    the same bits for a row in each."""
    march, library = path
    torch.manual_seed(4)
    for group, (out_features, in_features) in [(64, (96, 64)), (64, (48, 192)), (128, (48, 2816)), (256, (16, 512))]:
        codes = torch.randint(0, 16, (out_features, in_features))
        pairs = (torch.randn(out_features, in_features // group, 2) * 0.05).to(torch.bfloat16)
        packed, panels = int4.pack(codes), int4.panel_pairs(pairs)
        for rows in (1, 2, 5, 6, 7, 8, 9, 17, 48):
            x = torch.randn(rows, in_features) * torch.logspace(-3, 2, rows)[:, None]
            got = library.int4dot(x, packed, panels)
            want = int4_reference(x, codes, pairs)
            assert got.dtype == torch.float32 and got.shape == (rows, out_features)
            assert ((got.double() - want).norm() / want.norm()) < 1e-6, (march, group, rows)
            for i in (0, rows // 2, rows - 1):
                assert torch.equal(library.int4dot(x[i : i + 1], packed, panels), got[i : i + 1]), (march, rows, i)
    # the largest sums do not overflow 16 bits: every code 15 against -127, 256 inputs a group
    most = int4.pack(torch.full((16, 512), 15))
    pairs = int4.panel_pairs(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]] * 16, dtype=torch.bfloat16))
    for rows in (1, 9):
        assert library.int4dot(torch.full((rows, 512), -1.0), most, pairs).tolist() == [[-(15 - 8) * 512.0] * 16] * rows


def test_every_path_finishes_a_layer_as_torch_does(path):
    """bfloat16 or float32 rows in, the output in either with the bias added: the bits of the float32 output cast
    and the bias added by torch (``y.to(dtype) + bias``), ties and NaN included, for int8dot and int4dot."""
    march, library = path
    torch.manual_seed(5)
    w, scale = int8.quantize_weight(torch.randn(40, 2816))
    codes = torch.randint(0, 16, (48, 512))
    packed = int4.pack(codes)
    panels = int4.panel_pairs((torch.randn(48, 4, 2) * 0.05).to(torch.bfloat16))
    kernels_ = {
        "int8dot": (lambda x, *finish: library.int8dot(x, w, scale, *finish), 40, 2816),
        "int4dot": (lambda x, *finish: library.int4dot(x, packed, panels, *finish), 48, 512),
    }
    for name, (multiply, out_features, in_features) in kernels_.items():
        for rows in (1, 3, 9, 48):
            x = torch.randn(rows, in_features) * torch.logspace(-3, 2, rows)[:, None]
            for rows_dtype in (torch.float32, torch.bfloat16):
                plain = multiply(x.to(rows_dtype))  # float32, no bias
                assert torch.equal(plain, multiply(x.to(rows_dtype).float())), (march, name, rows)  # widened exactly
                for dtype in (torch.float32, torch.bfloat16):
                    bias = torch.randn(out_features).to(dtype)
                    bias[:3] = torch.tensor([float("nan"), 0.0, -0.0])
                    got = multiply(x.to(rows_dtype), dtype, bias)
                    assert got.dtype == dtype and got.shape == (rows, out_features)
                    assert torch.equal(got[:, 1:], (plain.to(dtype) + bias)[:, 1:]), (march, name, rows, dtype)
                    assert got[:, 0].isnan().all()
                    assert torch.equal(multiply(x.to(rows_dtype), dtype), plain.to(dtype)), (march, name, rows)
    # outputs of 1.0 plus biases halfway between two bfloat16 values: to even, as torch rounds
    ones, eye = torch.ones(1, 3), torch.eye(3, dtype=torch.int8)
    assert library.int8dot(ones, eye, torch.ones(3)).tolist() == [[1.0] * 3]
    halfway = torch.tensor([2**-8, 3 * 2**-8, -(2**-9)], dtype=torch.bfloat16)
    got = library.int8dot(ones, eye, torch.ones(3), torch.bfloat16, halfway)
    assert got.tolist() == (torch.ones(1, 3, dtype=torch.bfloat16) + halfway).tolist() == [[1.0, 1.015625, 1.0]]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v in float64."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(scores, dim=-1) @ v.double()


def test_attend_on_every_path_is_one_querys_attention_over_a_cache_in_a_larger_buffer(path):
    march, library = path
    torch.manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        # head sizes with and without a partial vector of values (or pairs of bfloat16 values) on both vector paths,
        # an odd one, and more than four vectors of them
        for heads, size, tokens in [(4, 16, 1), (3, 80, 5), (32, 88, 77), (2, 64, 600), (2, 256, 40), (3, 20, 9),
                                    (2, 7, 30)]:  # fmt: skip
            room = tokens + 13  # the cache is a view of the first tokens of its buffer, as the engine's grows
            keys, values = (torch.randn(1, heads, room, size).to(dtype) * 3 for _ in range(2))
            qkv = torch.randn(1, 1, heads, 3 * size).to(dtype).transpose(1, 2)  # a query as transformers slices it
            query = qkv[..., :size]
            k, v = keys[:, :, :tokens], values[:, :, :tokens]
            got = library.attend(query, k, v, size**-0.5)
            assert got.dtype == dtype and got.shape == (1, heads, 1, size) and got.is_contiguous()
            want = attention_reference(query, k, v, size**-0.5)
            if dtype == torch.float32:
                assert (got.double() - want).abs().max() < 1e-5, (march, heads, size, tokens)
            else:  # computed in float32, rounded once to bfloat16
                assert torch.equal(got, want.float().to(torch.bfloat16)) or (
                    (got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6
                ).all(), (march, heads, size, tokens)
            assert torch.equal(library.attend(query.contiguous(), k.contiguous(), v.contiguous(), size**-0.5), got)
    # one token attends to itself only; a huge score does not overflow the softmax, nor do scores far below zero
    # vanish (the largest is subtracted, not 0)
    far = library.attend(torch.tensor([[[[10.0, 0.0]]]]), torch.tensor([[[[-100.0, 0.0], [-100.1, 0.0]]]]),
                         torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]]), 1.0)  # fmt: skip
    assert torch.allclose(far, torch.tensor([[[[1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]]]]), atol=1e-6)
    k = torch.tensor([[[[1e4, 0.0]]]])
    assert library.attend(torch.tensor([[[[1e4, 0.0]]]]), k, torch.tensor([[[[2.0, 3.0]]]]), 1.0).tolist() == [[[[2.0, 3.0]]]]


def test_decode_attention_on_every_path_has_the_bits_of_the_steps_it_fuses(path):
    """A layer's attention half in one call: the bits of int8dot or int4dot, transformers' rotary as
    rinna_cli.attention.rotate computes it, the cache written at the next token, attend, the dense layer and the
    residual, each a torch operation here; no other token of the cache touched."""
    from rinna_cli.attention import rotate

    march, library = path
    torch.manual_seed(9)
    heads, size, tokens, room = 4, 32, 7, 12
    width = heads * size

    def weights(kind: str, out_features: int) -> native.Weights:
        layer = torch.nn.Linear(width, out_features)
        if kind == "int8":
            w, scale = int8.quantize_weight(layer.weight.detach())
            return native.Weights(w, scale, 0, layer.bias.detach())
        tensors = int4.quantize_weight(layer.weight.detach(), 64)
        return native.Weights(tensors["weight"], tensors["scales_zeros"], 64, layer.bias.detach())

    def linear(x, w: native.Weights, dtype):
        multiply = library.int4dot if w.group else library.int8dot
        return multiply(x.reshape(1, -1), w.weight, w.scales, dtype, w.bias)

    for kind in ("int8", "int4"):
        for dtype in (torch.float32, torch.bfloat16):
            qkv, dense = (w._replace(bias=w.bias.to(dtype)) for w in (weights(kind, 3 * width), weights(kind, width)))
            x, residual = (torch.randn(1, 1, width).to(dtype) for _ in range(2))
            angles = torch.rand(size) * 6
            cos, sin = angles.cos().to(dtype)[None, None], angles.sin().to(dtype)[None, None]
            keys, values = (torch.randn(1, heads, room, size).to(dtype) for _ in range(2))
            before = keys.clone(), values.clone()
            got = library.decode_attention(
                native.AttentionStep(x, qkv, cos, sin, keys, values, tokens, dense, residual, 0.3)
            )

            heads_qkv = linear(x, qkv, dtype).view(1, 1, heads, 3 * size).transpose(1, 2)
            rotated = rotate(heads_qkv[..., : 2 * size].unflatten(-1, (2, size)), cos[:, :, None], sin[:, :, None])
            want_keys, want_values = before[0].clone(), before[1].clone()
            want_keys[:, :, tokens], want_values[:, :, tokens] = rotated[:, :, 0, 1], heads_qkv[:, :, 0, 2 * size :]
            context = library.attend(
                rotated[..., 0, :], want_keys[:, :, : tokens + 1], want_values[:, :, : tokens + 1], 0.3
            ).reshape(1, 1, width)
            want = linear(context, dense, dtype).reshape(1, 1, width) + residual
            assert got.dtype == dtype and torch.equal(got, want), (march, kind, dtype)
            assert torch.equal(keys, want_keys) and torch.equal(values, want_values), (march, kind, dtype)


def test_what_decode_attention_cannot_take_is_refused_before_any_kernel_runs(built):
    """A step decode.c cannot take (weights the kernels cannot read, a cache that is not (1, heads, room, size) or
    has no room for the token, rows of another dtype) is refused with ValueError, nothing written: the layer then
    takes its operations one by one."""
    library = built["native"]
    heads, size = 2, 64
    width = heads * size
    w, scale = int8.quantize_weight(torch.randn(3 * width, width))
    qkv = native.Weights(w, scale, 0, torch.zeros(3 * width))
    dense = native.Weights(*int8.quantize_weight(torch.randn(width, width)), 0, torch.zeros(width))
    x, cos = torch.randn(1, 1, width), torch.ones(1, 1, size)
    keys = torch.zeros(1, heads, 4, size)
    step = native.AttentionStep(x, qkv, cos, cos, keys, keys.clone(), 3, dense, x, 0.1)
    assert step.fusable() and library.decode_attention(step).shape == x.shape
    tensors = int4.quantize_weight(torch.randn(3 * width, width), 64)
    refused = {
        "a short bias": {"qkv": qkv._replace(bias=torch.zeros(5))},
        "int4 codes in groups of 96": {"qkv": native.Weights(tensors["weight"], tensors["scales_zeros"], 96, None)},
        "int8 weights read as int4": {"qkv": qkv._replace(group=64)},
        "a cache of three dimensions": {"keys": keys[0], "values": keys[0].clone()},
        "two sequences' cache": {"keys": torch.zeros(2, heads, 4, size), "values": torch.zeros(2, heads, 4, size)},
        "no room for the token": {"tokens": 4},
        "bfloat16 rows": {"x": x.bfloat16()},
        "a strided row": {"x": torch.randn(1, 1, 2 * width)[..., ::2]},
    }
    for case, change in refused.items():
        wrong = step._replace(**change)
        before = wrong.keys.clone()
        assert not wrong.fusable(), case
        with pytest.raises(ValueError, match="takes one float32 or bfloat16 row and a cache with room for it"):
            library.decode_attention(wrong)
        assert torch.equal(wrong.keys, before), case


def test_attend_refuses_what_is_not_one_query_per_head(built):
    library = built["native"]
    q, k = torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="one float32 or bfloat16 query per head"):
        library.attend(torch.zeros(1, 2, 3, 8), k, k, 1.0)  # three query rows: a prompt, which SDPA takes
    with pytest.raises(ValueError, match="one float32 or bfloat16 query per head"):
        library.attend(q, k.to(torch.bfloat16), k, 1.0)
    with pytest.raises(ValueError, match="one float32 or bfloat16 query per head"):
        library.attend(q, torch.zeros(1, 3, 5, 8), torch.zeros(1, 3, 5, 8), 1.0)
    with pytest.raises(ValueError, match="heads of 1 to 1024 values"):
        library.attend(torch.zeros(1, 1, 1, 1025), torch.zeros(1, 1, 2, 1025), torch.zeros(1, 1, 2, 1025), 1.0)
    with pytest.raises(ValueError, match="at least one cached token"):
        library.attend(q, torch.zeros(1, 2, 0, 8), torch.zeros(1, 2, 0, 8), 1.0)


def test_the_native_build_takes_the_widest_path_this_cpu_has(built):
    want = "avx512-vnni" if {"avx512_vnni", "avx512bw"} <= FLAGS else "avx2" if "avx2" in FLAGS else "c"
    assert built["native"].paths == {"int8dot": want, "int4dot": want}
    if "x86-64" in built:
        assert built["x86-64"].paths == {"int8dot": "c", "int4dot": "c"}


def test_wrong_operands_are_refused_and_no_rows_are_none(built):
    library = built["native"]
    weight = torch.zeros(8, 64, dtype=torch.int8)
    assert library.int8dot(torch.zeros(0, 64), weight, torch.ones(8)).shape == (0, 8)
    with pytest.raises(ValueError, match="int8dot takes int8 weights"):
        library.int8dot(torch.zeros(2, 64), weight.float(), torch.ones(8))
    with pytest.raises(ValueError, match="int8dot takes int8 weights"):
        library.int8dot(torch.zeros(2, 32), weight, torch.ones(8))
    with pytest.raises(ValueError, match="one scale per output"):
        library.int8dot(torch.zeros(2, 64), weight, torch.ones(4))
    with pytest.raises(ValueError, match="finish float32 or bfloat16 outputs"):
        library.int8dot(torch.zeros(2, 64), weight, torch.ones(8), torch.float16)
    with pytest.raises(ValueError, match="with a torch.float32 bias of \\(8,\\)"):
        library.int8dot(torch.zeros(2, 64), weight, torch.ones(8), torch.bfloat16, torch.zeros(8))
    with pytest.raises(ValueError, match="with a torch.float32 bias of \\(4,\\)"):
        library.int8dot(torch.zeros(2, 64), weight, torch.ones(8), torch.float32, torch.zeros(4))
    codes, pairs = torch.zeros(16, 64, dtype=torch.uint8), torch.zeros(1, 1, 2, 16, dtype=torch.bfloat16)
    assert library.int4dot(torch.zeros(0, 128), codes, pairs).shape == (0, 16)
    with pytest.raises(ValueError, match="int4dot takes uint8 codes"):
        library.int4dot(torch.zeros(2, 64), codes, pairs)
    with pytest.raises(ValueError, match="16 outputs at a time"):
        library.int4dot(torch.zeros(2, 128), codes[:8], pairs)
    with pytest.raises(ValueError, match="per group of 64, 128 or 256"):
        library.int4dot(torch.zeros(2, 128), codes, torch.zeros(1, 4, 2, 16, dtype=torch.bfloat16))  # groups of 32
    with pytest.raises(ValueError, match="per group of 64, 128 or 256"):
        library.int4dot(torch.zeros(2, 128), codes, torch.zeros(16, 1, 2, dtype=torch.bfloat16))  # by row, not panel
    with pytest.raises(ValueError, match="per group of 64, 128 or 256"):
        library.int4dot(torch.zeros(2, 128), codes, pairs.float())


def test_it_is_compiled_once_per_source_compiler_and_cpu(tmp_path, monkeypatch):
    first = native.build(tmp_path)
    built_at = first.stat().st_mtime_ns
    real = subprocess.run

    def no_compiling(command, *args, **kwargs):
        assert "--version" in command, "compiled again"
        return real(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left


def test_a_new_build_removes_those_of_other_sources_and_keeps_this_sources_for_other_cpus(tmp_path):
    mine = native.version()[:8]
    older = [tmp_path / "int8dot-0123456789abcdef.so", tmp_path / "native-0123456789abcdef.so",
             tmp_path / f"native-{'0' * 8}-0123456789ab.so"]  # fmt: skip
    kept = [tmp_path / f"native-{mine}-0123456789ab.so", tmp_path / "notes.txt"]  # another CPU's; not a build
    for path in older + kept:
        path.write_bytes(b"")
    built = native.build(tmp_path)
    assert built.name.startswith(f"native-{mine}-") and built.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([built.name] + [p.name for p in kept])


def test_no_compiler_means_no_kernel_and_the_others_still_work(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(native.Unavailable, match="no C compiler"):
        native.build(tmp_path)
    env = {**os.environ, "RINNA_CLI_HOME": str(tmp_path)}
    child = subprocess.Popen(
        [sys.executable, "-c", kernels._PROBE], stdout=subprocess.PIPE, text=True, env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    working = kernels.finish_probe(child)
    assert child.returncode == 0
    assert "int8:int8dot" not in working and "int4:int4dot" not in working and "attention:attend" not in working
    assert {f"int8:{name}" for name in int8.Int8Linear.KERNELS if name != "int8dot"} <= working
    assert {f"int4:{name}" for name in int4.Int4Linear.KERNELS if name != "int4dot"} <= working


def test_a_compiler_installed_later_is_probed_and_planned_for(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    without = kernels.machine_key("int8")
    env = {**os.environ, "RINNA_CLI_HOME": str(tmp_path / "home")}
    child = subprocess.Popen([sys.executable, "-c", kernels._PROBE], stdout=subprocess.PIPE, text=True, env=env,
                             cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert "int8:int8dot" not in kernels.probe_answer(child, tmp_path)
    assert kernels.cached_probe(tmp_path) is not None  # saved for this machine as it is
    monkeypatch.delenv("CC")
    assert without["compiler"] == "" and kernels.machine_key("int8")["compiler"] == native.compiler() != ""
    assert kernels.cached_probe(tmp_path) is None  # with a compiler: probed again, and the plan's key differs


def test_a_compiler_error_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken 1.0 && exit 0\necho 'cc: error: no' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.raises(native.Unavailable, match=r"failed: cc: error: no$"):
        native.build(tmp_path / "out")
