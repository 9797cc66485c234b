"""rinna-cli's own int8 kernel (``int8dot.c``), compiled on the machine at its first use.

torch's ``_int_mm`` takes a bandwidth-bound path for one row and oneDNN's compute-bound
GEMM for two or more, so a batched decode step of 2–8 rows cost about twice one row on
the AVX-512 Xeon and Zen 5 (docs/benchmarks.md), where reading the weights once should
cost the same. This kernel reads each weight row once for up to eight rows, and does in
one call what :func:`rinna_cli.int8.int_mm` does in nine torch operations (quantizing
the rows, the int32 sums, scaling them back) with the same IEEE operations in the same
order: its output is equal to ``int_mm``'s, so a sequence's replies do not depend on
which of the two multiplied it. It is built with the C compiler (``$CC`` or ``cc``) for
this CPU (``-march=native``: AVX-512 VNNI, AVX2 or plain C) into the cache folder, once
per source, compiler and CPU; no compiler means no such kernel, and the planner
(:mod:`rinna_cli.kernels`) measures it against torch's like any other.

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

import torch

SOURCE = Path(__file__).with_name("int8dot.c")


class Unavailable(RuntimeError):
    """The kernel cannot be built or loaded on this machine."""


def compiler() -> str | None:
    """The C compiler that would build the kernel: ``$CC`` or ``cc`` on the PATH."""
    return shutil.which(os.environ.get("CC") or "cc")


def build(folder: Path, march: str = "native") -> Path:
    """The shared library for this source, compiler and CPU in ``folder``, compiled if it is not there yet."""
    cc = compiler()
    if cc is None:
        raise Unavailable("no C compiler (cc) to build it")
    from rinna_cli.kernels import cpu_identity

    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise Unavailable(f"{cc} does not run ({err})") from None
    identity = "\n".join([SOURCE.read_text(encoding="utf-8"), cc, version, march, *cpu_identity()])
    path = folder / f"int8dot-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    command = [cc, "-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", str(temporary)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise Unavailable(f"{cc} failed: {done.stderr.strip()[-300:]}")
        os.replace(temporary, path)  # a concurrent first start builds the same file
    except (OSError, subprocess.SubprocessError) as err:
        raise Unavailable(f"{cc} failed ({err})") from None
    finally:
        temporary.unlink(missing_ok=True)
    return path


class Library:
    """The loaded kernel."""

    def __init__(self, path: Path):
        self._lib = ctypes.CDLL(str(path))
        self._dot = self._lib.rinna_int8dot
        self._dot.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
        self._dot.restype = ctypes.c_int
        self._lib.rinna_int8dot_path.restype = ctypes.c_char_p
        self.path = self._lib.rinna_int8dot_path().decode()  # "avx512-vnni", "avx2" or "c"

    def linear(self, rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``int8.int_mm(rows, weight, scale)``: rows (m, in) by int8 ``weight`` (out, in) and its float32 scale."""
        if weight.dtype != torch.int8 or scale.dtype != torch.float32 or rows.shape[1] != weight.shape[1]:
            raise ValueError(f"int8dot takes int8 weights and float32 scales, not {weight.dtype} {tuple(weight.shape)}")
        if scale.shape != (weight.shape[0],):
            raise ValueError(f"int8dot takes one scale per output, not {tuple(scale.shape)}")
        rows, weight, scale = rows.float().contiguous(), weight.contiguous(), scale.contiguous()
        out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)
        m, n, k = rows.shape[0], weight.shape[0], weight.shape[1]
        failed = self._dot(
            rows.data_ptr(), weight.data_ptr(), scale.data_ptr(), out.data_ptr(), m, n, k, torch.get_num_threads()
        )
        if failed:
            raise MemoryError("int8dot could not allocate its rows")
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
    """This machine's build of the kernel, made once per process (:class:`Unavailable` if it cannot be had)."""
    found = _load()
    if isinstance(found, Unavailable):
        raise Unavailable(str(found))
    return found
