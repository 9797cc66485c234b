"""Pages of the mapped weights cache given back to the system, and nothing else ever."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from rinna_cli import mapped


def resident_file_bytes() -> int:
    line = next(line for line in open("/proc/self/status") if line.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


def test_released_pages_of_a_mapped_file_leave_memory_and_read_back_the_same(tmp_path):
    values = torch.arange(16 * 2**20, dtype=torch.int32).reshape(-1, 1024)  # 64 MiB
    save_file({"values": values}, str(tmp_path / "cache.safetensors"))
    mapped_values = load_file(str(tmp_path / "cache.safetensors"))["values"]
    pages = mapped.file_pages(mapped_values)
    assert pages is not None and pages.length >= 64 * 2**20 - 2 * 4096
    assert int(mapped_values.sum()) == int(values.sum())  # every page touched
    touched = resident_file_bytes()
    pages.release()
    assert resident_file_bytes() <= touched - 60 * 2**20
    assert torch.equal(mapped_values, values)  # faulted back from the file


def test_memory_that_is_no_file_is_never_released():
    assert mapped.file_pages(torch.ones(2**22)) is None
    assert mapped.file_pages(torch.ones(2**22)[::2]) is None  # nor what is not one contiguous range
