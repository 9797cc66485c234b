"""Giving back, and fetching ahead, the resident pages of tensors memory-mapped from the weights cache.

A tensor loaded from the cache lives in a private mapping of the file: every page it
touched counts in this process's RSS until told otherwise, although it is a clean copy
of what the kernel's page cache holds anyway. ``madvise(MADV_DONTNEED)`` drops such
pages from the process, and the next use faults them back from the page cache (on the
AMX Xeon 0.19 s for 3.5 GB, against 3.3 s from disk). Only a file's pages may be dropped
so: anonymous memory would read back as zeros, so :func:`file_pages` checks the
mapping first (``/proc/self/maps``; elsewhere than Linux nothing is released).

The other way, :func:`fetch_ahead` maps a loaded model's pages in a background thread
(``MADV_POPULATE_READ``, or only ``MADV_WILLNEED``'s read-ahead before Linux 5.14), so
that the first prompt does not fault in 3.6 GB a page at a time: on Zen 5 its first
token took 1.7 s with the file in the page cache and 9.3 s without, against 0.6 s later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from dataclasses import dataclass

import torch

_MADV_WILLNEED, _MADV_DONTNEED, _MADV_POPULATE_READ = 3, 4, 22  # the same on every Linux architecture torch ships for
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    function.restype = ctypes.c_int
    return function


_MADVISE = _madvise()


@dataclass(frozen=True)
class Pages:
    """The whole pages inside one tensor that lie in a mapping of a file."""

    start: int
    length: int

    def release(self) -> None:
        """Drop the pages from this process (they stay in the page cache); the tensor reads the same afterwards."""
        if _MADVISE is not None and self.length:
            _MADVISE(self.start, self.length, _MADV_DONTNEED)

    def fetch(self) -> None:
        """Map the pages into this process now (reading them from the file if the page cache lacks them)."""
        if _MADVISE is not None and self.length and _MADVISE(self.start, self.length, _MADV_POPULATE_READ) != 0:
            _MADVISE(self.start, self.length, _MADV_WILLNEED)  # an older kernel: at least read ahead


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process that map a file (not the heap, the stack or anonymous memory)."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    start, end = (int(part, 16) for part in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass
    return ranges


def file_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> Pages | None:
    """``tensor``'s inner pages, if all of its bytes lie in one file mapping (of ``mappings``, default: now); else
    None (never to be released)."""
    if _MADVISE is None or not tensor.is_contiguous() or tensor.device.type != "cpu":
        return None
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    if not any(start <= begin and end <= stop for start, stop in mappings or _file_mappings()):
        return None
    first, last = -(-begin // _PAGE) * _PAGE, end // _PAGE * _PAGE
    return Pages(first, max(0, last - first))


def fetch_ahead(tensors: list[torch.Tensor]) -> threading.Thread:
    """Fetch the file-mapped pages of ``tensors``, in order, in a daemon thread (madvise lets go of the GIL)."""

    def run() -> None:
        mappings = _file_mappings()
        for tensor in tensors:
            pages = file_pages(tensor, mappings)
            if pages is not None:
                pages.fetch()

    thread = threading.Thread(target=run, name="rinna-fetch-ahead", daemon=True)
    thread.start()
    return thread
