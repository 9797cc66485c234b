"""rinna-cli's own CPU kernels (``int8dot.c``, ``int4dot.c``, ``attend.c``), compiled on the machine at their first use.

torch's ``_int_mm`` takes a bandwidth-bound path for one row and oneDNN's compute-bound
GEMM for two or more, so a batched decode step of 2–8 rows cost about twice one row on
the AVX-512 Xeon and Zen 5, and on the Zen 3 of 2026-12-03 (torch 2.13) even one row ran
at a tenth of the memory's speed (docs/benchmarks.md); torch's int4 kernel decoded at a
third of it there. Reading the weights once per step should be all a decode step costs:
``int8dot`` does that for int8, giving :func:`rinna_cli.int8.int_mm`'s outputs bit for
bit (the same IEEE operations in the same order, so a sequence's replies do not depend
on which of the two multiplied it), and ``int4dot`` for rinna-cli's int4 layout
(:mod:`rinna_cli.int4`). Both read each weight row once for up to eight rows, and take a
prompt's rows against weights kept in the CPU's caches (compute-bound: faster than oneDNN's
int8 GEMM on the Zen 4 of 2026-12-04 with AVX-512 VNNI); ``attend`` is a
decode step's attention, one query per head over the KV cache (:mod:`rinna_cli.attention`). The two matrix
kernels read float32 or bfloat16 rows and write either with the layer's bias added, with the bits of torch's
``y.to(dtype) + bias`` (``QuantLinear.FINISHING``): a layer is one call, not three. They are
built with the C compiler (``$CC`` or ``cc``) for this CPU (``-march=native``: AVX-512
VNNI, AVX2 or plain C) into the cache folder, once per source, compiler and CPU; no
compiler means no such kernels, and the planner (:mod:`rinna_cli.kernels`) measures them
against torch's like any other.

OpenMP comes from the libgomp torch has loaded (the same soname), so both share one
pool of threads. ctypes lets go of the GIL during a call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("int8dot.c", "int4dot.c", "attend.c", "decode.c"))
HEADERS = (Path(__file__).with_name("native.h"),)  # what the sources include: part of what a build is of
FINISHED = {torch.float32: 0, torch.bfloat16: 1}  # the dtypes the kernels read and write, and their flag


class Unavailable(RuntimeError):
    """The kernels cannot be built or loaded on this machine."""


def compiler() -> str | None:
    """The C compiler that would build the kernels: ``$CC`` or ``cc`` on the PATH."""
    return shutil.which(os.environ.get("CC") or "cc")


def version() -> str:
    """A hash of the kernels' sources: a plan measured on other sources is measured again."""
    return hashlib.sha256(b"".join(source.read_bytes() for source in (*SOURCES, *HEADERS))).hexdigest()[:16]


def build(folder: Path, march: str = "native") -> Path:
    """The shared library for these sources, compiler and CPU in ``folder``, compiled if it is not there yet.

    A new build removes those of other sources (an earlier rinna-cli's, named by the sources' hash); builds of these
    sources for another compiler or CPU (a home folder shared between machines) stay."""
    cc = compiler()
    if cc is None:
        raise Unavailable("no C compiler (cc) to build it")
    from rinna_cli.kernels import cpu_identity

    try:
        compiler_version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise Unavailable(f"{cc} does not run ({err})") from None
    sources = [source.read_text(encoding="utf-8") for source in (*SOURCES, *HEADERS)]
    identity = "\n".join([*sources, cc, compiler_version, march, *cpu_identity()])
    sources_hash = version()[:8]
    path = folder / f"native-{sources_hash}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}.so"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    command = [cc, "-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", *map(str, SOURCES), "-o", str(temporary)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise Unavailable(f"{cc} failed: {done.stderr.strip()[-300:]}")
        os.replace(temporary, path)  # a concurrent first start builds the same file
    except (OSError, subprocess.SubprocessError) as err:
        raise Unavailable(f"{cc} failed ({err})") from None
    finally:
        temporary.unlink(missing_ok=True)
    for stale in [*folder.glob("native-*.so"), *folder.glob("int8dot-*.so")]:  # a process using one keeps its mapping
        if not stale.name.startswith(f"native-{sources_hash}-"):
            stale.unlink(missing_ok=True)
    return path


class Weights(NamedTuple):
    """A quantized layer as rinna-cli's kernels read it: int8 ``weight`` (out, in) and float32 ``scales`` per output
    (``group`` 0, int8dot), or int4 codes and their bfloat16 scales in groups of ``group`` inputs (int4dot); ``bias``
    (one per output) or None."""

    weight: torch.Tensor
    scales: torch.Tensor
    group: int
    bias: torch.Tensor | None

    def bias_pointer(self) -> int | None:
        return None if self.bias is None else self.bias.data_ptr()

    def refusal(self, inputs: int) -> str | None:
        """Why the kernels cannot multiply rows of ``inputs`` values by these weights; None where they can."""
        weight, scales = self.weight, self.scales
        if self.group == 0:
            if (
                weight.dim() != 2
                or weight.dtype != torch.int8
                or scales.dtype != torch.float32
                or weight.shape[1] != inputs
            ):
                return f"int8dot takes int8 weights and float32 scales, not {weight.dtype} {tuple(weight.shape)}"
            if scales.shape != (weight.shape[0],):
                return f"int8dot takes one scale per output, not {tuple(scales.shape)}"
            return None
        if weight.dim() != 2 or weight.dtype != torch.uint8 or weight.shape[1] * 2 != inputs or weight.shape[0] % 16:
            return (
                f"int4dot takes uint8 codes of the rows' inputs, 16 outputs at a time, not {weight.dtype} "
                f"{tuple(weight.shape)}"
            )
        groups = inputs // self.group if self.group > 0 else 0
        if (
            scales.dtype != torch.bfloat16
            or self.group not in (64, 128, 256)
            or groups * self.group != inputs
            or scales.shape != (weight.shape[0] // 16, groups, 2, 16)
        ):
            return f"int4dot takes bfloat16 scales per group of 64, 128 or 256, not {tuple(scales.shape)}"
        return None

    def takes(self, outputs: int, inputs: int, dtype: torch.dtype) -> bool:
        """Whether the kernels read these weights of ``outputs`` by ``inputs`` as they are, any bias in ``dtype``."""
        bias = self.bias
        return (
            self.weight.shape[0] == outputs
            and self.refusal(inputs) is None
            and self.weight.is_contiguous()
            and self.scales.is_contiguous()
            and (bias is None or (bias.dtype == dtype and bias.shape == (outputs,) and bias.is_contiguous()))
        )


class AttentionStep(NamedTuple):
    """A GPT-NeoX layer's attention half for one decode row of one sequence, as ``decode.c`` takes it: ``x`` (the
    layer-normed row) through ``qkv``, each head's query and key rotated by ``cos`` and ``sin`` (the row's position),
    key and value written into the cache's ``keys`` and ``values`` (1, heads, room, size) at token ``tokens``,
    attention over the ``tokens + 1`` tokens (``scale``), then ``dense`` plus ``residual``."""

    x: torch.Tensor
    qkv: Weights
    cos: torch.Tensor
    sin: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    tokens: int
    dense: Weights
    residual: torch.Tensor
    scale: float

    def fusable(self) -> bool:
        """Whether ``decode_attention`` takes it: rows ``x`` and ``residual`` of ``heads * size`` values, ``cos`` and
        ``sin`` of ``size``, all contiguous, ``keys`` and ``values`` views of any strides but along ``size`` with room
        for the token, all float32 or all bfloat16 on the CPU; ``qkv`` of ``3 * heads * size`` outputs, ``dense``
        square, both weights the kernels read as they are."""
        x, keys, values, residual, cos, sin = self.x, self.keys, self.values, self.residual, self.cos, self.sin
        if keys.dim() != 4 or keys.shape != values.shape:
            return False
        heads, size = keys.shape[1], keys.shape[3]
        width, dtype = heads * size, x.dtype
        return (
            dtype in FINISHED
            and dtype == residual.dtype == cos.dtype == sin.dtype == keys.dtype == values.dtype
            and x.numel() == residual.numel() == width
            and cos.numel() == sin.numel() == size
            and all(t.is_contiguous() for t in (x, residual, cos, sin))
            and keys.shape[0] == 1
            and keys.stride(-1) == values.stride(-1) == 1
            and 0 <= self.tokens < keys.shape[2]
            and 0 < size <= 1024
            and size % 2 == 0
            and self.qkv.takes(3 * width, width, dtype)
            and self.dense.takes(width, width, dtype)
            and x.device.type == keys.device.type == values.device.type == "cpu"
        )


def attendable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """What ``attend`` takes: ``query`` (1, heads, 1, size) and ``key``, ``value`` (1, heads, tokens, size), views of
    any strides but along ``size``, at least one token, 1 to 1024 values a head, all float32 or all bfloat16 on the
    CPU."""
    return (
        query.dim() == 4
        and query.shape[0] == 1
        and query.shape[2] == 1
        and key.shape == value.shape
        and key.shape[:2] == query.shape[:2]
        and key.shape[3] == query.shape[3]
        and key.shape[2] > 0
        and 0 < query.shape[3] <= 1024
        and query.dtype in (torch.float32, torch.bfloat16)
        and key.dtype == value.dtype == query.dtype
        and query.device.type == key.device.type == value.device.type == "cpu"
    )


class Library:
    """The loaded kernels."""

    def __init__(self, path: Path):
        self._lib = ctypes.CDLL(str(path))
        # rows, their dtype; the weights and their scales; bias, out, their dtype; the sizes and the threads
        finished: list[type[ctypes.c_void_p] | type[ctypes.c_int]] = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int
        ]  # fmt: skip
        self._lib.rinna_int8dot.argtypes = finished + [ctypes.c_int] * 4
        self._lib.rinna_int4dot.argtypes = finished + [ctypes.c_int] * 5
        self._lib.rinna_attend.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_long] * 5 + [
            ctypes.c_float, ctypes.c_int, ctypes.c_int]  # fmt: skip
        pointer, number = ctypes.c_void_p, ctypes.c_int
        self._lib.rinna_decode_attention.argtypes = [
            pointer, number, pointer, pointer, number, pointer, pointer, pointer, pointer, pointer,
            ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long, number,
            pointer, pointer, number, pointer, pointer, pointer, number, number, ctypes.c_float, number,
        ]  # fmt: skip
        for function in (
            self._lib.rinna_int8dot,
            self._lib.rinna_int4dot,
            self._lib.rinna_attend,
            self._lib.rinna_decode_attention,
        ):
            function.restype = ctypes.c_int
        self.paths = {}  # kernel -> "avx512-vnni", "avx2" or "c"
        for name in ("int8dot", "int4dot"):
            describe = getattr(self._lib, f"rinna_{name}_path")
            describe.restype = ctypes.c_char_p
            self.paths[name] = describe().decode()

    def int8dot(
        self,
        rows: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``int8.int_mm(rows, weight, scale).to(dtype) + bias``, bit for bit: rows (m, in) by int8 ``weight``
        (out, in) and its float32 scale, in ``dtype`` (float32 or bfloat16, as the bias)."""
        refusal = Weights(weight, scale, 0, bias).refusal(rows.shape[1])
        if refusal:
            raise ValueError(refusal)
        return self._call(self._lib.rinna_int8dot, rows, weight, scale, dtype, bias, weight.shape[1])

    def int4dot(
        self,
        rows: torch.Tensor,
        codes: torch.Tensor,
        scales_zeros: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """rows (m, in) by int4 weights in :mod:`rinna_cli.int4`'s layout, in ``dtype`` (float32 or bfloat16, as the
        bias), the bias added: ``codes`` (out, in / 2) uint8 and ``scales_zeros`` (out / 16, groups, 2, 16)
        bfloat16, groups of 64, 128 or 256 inputs, out a multiple of 16."""
        in_features = codes.shape[1] * 2
        groups = scales_zeros.shape[1] if scales_zeros.dim() == 4 and scales_zeros.shape[1] else 0
        group = in_features // groups if groups else -1
        refusal = Weights(codes, scales_zeros, group, bias).refusal(rows.shape[1])
        if refusal:
            raise ValueError(refusal)
        return self._call(self._lib.rinna_int4dot, rows, codes, scales_zeros, dtype, bias, in_features, group)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """``softmax(scale * query @ key.T) @ value`` for what :func:`attendable` accepts; the result
        (1, heads, 1, size) in the query's dtype."""
        if not attendable(query, key, value):
            raise ValueError(
                "attend takes one float32 or bfloat16 query per head on the CPU, at least one cached token and heads "
                f"of 1 to 1024 values, not {tuple(query.shape)} {query.dtype} against {tuple(key.shape)} {key.dtype} "
                f"on {key.device}"
            )
        dtype = query.dtype
        query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
        heads, tokens, size = key.shape[1], key.shape[2], key.shape[3]
        out = torch.empty(1, heads, 1, size, dtype=dtype)
        failed = self._lib.rinna_attend(
            query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), heads, tokens, size,
            query.stride(1), key.stride(1), key.stride(2), value.stride(1), value.stride(2), scale,
            int(dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        if failed:  # 2 (no token, too wide a head) is refused above
            raise MemoryError("the native attention could not allocate its scores")
        return out

    def decode_attention(self, step: AttentionStep) -> torch.Tensor:
        """``step`` in one call (``decode.c``), with the bits of its operations in torch; what
        :meth:`AttentionStep.fusable` refuses raises ValueError."""
        if not step.fusable():
            raise ValueError("the native decode step takes one float32 or bfloat16 row and a cache with room for it")
        x, qkv, keys, values, dense, residual = step.x, step.qkv, step.keys, step.values, step.dense, step.residual
        out = torch.empty_like(residual)
        failed = self._lib.rinna_decode_attention(
            x.data_ptr(), FINISHED[x.dtype], qkv.weight.data_ptr(), qkv.scales.data_ptr(), qkv.group,
            qkv.bias_pointer(), step.cos.data_ptr(), step.sin.data_ptr(), keys.data_ptr(), values.data_ptr(),
            keys.stride(1), keys.stride(2), values.stride(1), values.stride(2), step.tokens, dense.weight.data_ptr(),
            dense.scales.data_ptr(), dense.group, dense.bias_pointer(), residual.data_ptr(), out.data_ptr(),
            keys.shape[1], keys.shape[3], step.scale, torch.get_num_threads(),
        )  # fmt: skip
        if failed:  # 2 (a kernel refused its shapes) is refused above
            raise MemoryError("the native decode step could not allocate its rows")
        return out

    @staticmethod
    def _call(
        function,
        rows: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor,
        dtype: torch.dtype,
        bias: torch.Tensor | None,
        *sizes: int,
    ) -> torch.Tensor:
        """The kernel's finished output: rows in float32 or bfloat16 as they are (any other dtype made float32),
        the result in ``dtype`` with ``bias`` (one per output, in ``dtype``) added."""
        m, n = rows.shape[0], weight.shape[0]
        if dtype not in FINISHED or (bias is not None and (bias.dtype != dtype or bias.shape != (n,))):
            raise ValueError(
                f"the kernels finish float32 or bfloat16 outputs with a bias of one {dtype} per output, not {dtype}"
                + ("" if bias is None else f" with a {bias.dtype} bias of {tuple(bias.shape)}")
            )
        rows = (rows if rows.dtype in FINISHED else rows.float()).contiguous()
        weight, scale = weight.contiguous(), scale.contiguous()
        bias = None if bias is None else bias.contiguous()
        out = torch.empty(m, n, dtype=dtype)
        failed = function(
            rows.data_ptr(), FINISHED[rows.dtype], weight.data_ptr(), scale.data_ptr(),
            None if bias is None else bias.data_ptr(), out.data_ptr(), FINISHED[dtype], m, n, *sizes,
            torch.get_num_threads(),
        )  # fmt: skip
        if failed:
            raise MemoryError("the native kernel could not allocate its rows")
        return out


@functools.cache
def _load() -> Library | Unavailable:
    from rinna_cli.config import cache_dir

    try:
        return Library(build(cache_dir() / "native"))
    except Unavailable as err:
        return err
    except OSError as err:  # a library that does not load
        return Unavailable(str(err))


def library() -> Library:
    """This machine's build of the kernels, made once per process (:class:`Unavailable` if it cannot be had)."""
    found = _load()
    if isinstance(found, Unavailable):
        raise Unavailable(str(found))
    return found
