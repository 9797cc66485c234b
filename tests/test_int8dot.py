"""rinna-cli's own few-row int8 kernel: int_mm's very outputs on every path it can build, skipped without a compiler."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rinna_cli import int8, int8dot, kernels

FLAGS = set(kernels.cpu_identity()[1].split())
# -march values for each path of int8dot.c, and what this CPU needs to run their code
MARCHES = {
    "native": set(),
    "x86-64-v3": {"avx2", "fma", "bmi2"},  # the AVX2 path
    "x86-64": set(),  # plain C
}
SHAPES = [(96, 256), (33, 100), (7, 65), (16, 2816), (40, 11264)]  # odd outputs, inputs not a multiple of 64 or 16


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, int8dot.Library]:
    folder = tmp_path_factory.mktemp("native")
    return {march: int8dot.Library(int8dot.build(folder, march)) for march, needs in MARCHES.items() if needs <= FLAGS}


@pytest.mark.parametrize("march", MARCHES)
def test_every_path_gives_int_mms_outputs_bit_for_bit(built, march):
    if march not in built:
        pytest.skip(f"this CPU cannot run -march={march} code")
    library = built[march]
    torch.manual_seed(3)
    for rows in (1, 2, 5, 8, 9, 17):
        for out_features, in_features in SHAPES:
            x = torch.randn(rows, in_features) * torch.logspace(-3, 2, rows)[:, None]
            w, scale = int8.quantize_weight(torch.randn(out_features, in_features))
            got, want = library.linear(x, w, scale), int8.int_mm(x, w, scale)
            assert got.dtype == torch.float32 and torch.equal(got, want), (march, rows, out_features, in_features)
    # ties round to even as torch.round does, an all-zero row is clamped, the largest sums do not overflow
    ties = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5], [0.0] * 8, [-127.0] * 8])
    ones = torch.tensor([1.0] * 3)
    assert torch.equal(library.linear(ties, torch.tensor([[1] * 8, [-127] * 8, [127] * 8], dtype=torch.int8), ones),
                       int8.int_mm(ties, torch.tensor([[1] * 8, [-127] * 8, [127] * 8], dtype=torch.int8), ones))  # fmt: skip
    most = torch.full((2, 4096), -127, dtype=torch.int8)
    got = library.linear(torch.full((1, 4096), -1.0), most, torch.ones(2))  # sums of 127 * 127 * 4096
    assert torch.equal(got, int8.int_mm(torch.full((1, 4096), -1.0), most, torch.ones(2)))
    assert got.tolist() == [[pytest.approx(127.0 * 4096)] * 2]


def test_the_native_build_takes_the_widest_path_this_cpu_has(built):
    want = "avx512-vnni" if {"avx512_vnni", "avx512bw"} <= FLAGS else "avx2" if "avx2" in FLAGS else "c"
    assert built["native"].path == want
    if "x86-64" in built:
        assert built["x86-64"].path == "c"


def test_wrong_operands_are_refused_and_no_rows_are_none(built):
    library = built["native"]
    weight = torch.zeros(8, 64, dtype=torch.int8)
    assert library.linear(torch.zeros(0, 64), weight, torch.ones(8)).shape == (0, 8)
    with pytest.raises(ValueError, match="int8dot takes int8 weights"):
        library.linear(torch.zeros(2, 64), weight.float(), torch.ones(8))
    with pytest.raises(ValueError, match="int8dot takes int8 weights"):
        library.linear(torch.zeros(2, 32), weight, torch.ones(8))
    with pytest.raises(ValueError, match="one scale per output"):
        library.linear(torch.zeros(2, 64), weight, torch.ones(4))


def test_it_is_compiled_once_per_source_compiler_and_cpu(tmp_path, monkeypatch):
    first = int8dot.build(tmp_path)
    built_at = first.stat().st_mtime_ns
    real = subprocess.run

    def no_compiling(command, *args, **kwargs):
        assert "--version" in command, "compiled again"
        return real(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert int8dot.build(tmp_path) == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left


def test_no_compiler_means_no_kernel_and_the_others_still_work(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(int8dot.Unavailable, match="no C compiler"):
        int8dot.build(tmp_path)
    env = {**os.environ, "RINNA_CLI_HOME": str(tmp_path)}
    child = subprocess.Popen(
        [sys.executable, "-c", kernels._PROBE], stdout=subprocess.PIPE, text=True, env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    working = kernels.finish_probe(child)
    assert child.returncode == 0
    assert "int8:int8dot" not in working
    assert {f"int8:{name}" for name in int8.Int8Linear.KERNELS if name != "int8dot"} <= working


def test_a_compiler_installed_later_is_probed_and_planned_for(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    without = kernels.machine_key("int8")
    env = {**os.environ, "RINNA_CLI_HOME": str(tmp_path / "home")}
    child = subprocess.Popen([sys.executable, "-c", kernels._PROBE], stdout=subprocess.PIPE, text=True, env=env,
                             cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert "int8:int8dot" not in kernels.probe_answer(child, tmp_path)
    assert kernels.cached_probe(tmp_path) is not None  # saved for this machine as it is
    monkeypatch.delenv("CC")
    assert without["compiler"] == "" and kernels.machine_key("int8")["compiler"] == int8dot.compiler() != ""
    assert kernels.cached_probe(tmp_path) is None  # with a compiler: probed again, and the plan's key differs


def test_a_compiler_error_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken 1.0 && exit 0\necho 'cc: error: no' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.raises(int8dot.Unavailable, match=r"failed: cc: error: no$"):
        int8dot.build(tmp_path / "out")
