"""CPU tensors over anonymous memory maps, for the two big buffers the package allocates itself.

- The KV cache: a map is the OS's zero pages until written, so the budget enters the resident
  memory as the cache fills instead of all at start-up (torch.zeros writes every page; a calloc
  served from memory the allocator kept is zeroed by writing it too).
- The model's weights (model.backbone.load_state_dict): one map advised for transparent huge
  pages (MADV_HUGEPAGE; Linux with THP "always" or "madvise"). A decode step streams every
  weight once, and with 4 KiB pages that is a TLB miss every 4 KiB: 2 MiB pages streamed
  smollm2-135m's 540 MB of fp32 weights 3-9% faster on this project's 2-vCPU EPYC (26.1 against
  24.8 GB/s in a standalone C++ GEMV pass over them, interleaved). Not for the KV cache: a huge
  page becomes resident whole, 2 MiB per layer and K/V at the first token written. When the
  cache empties, its pages go back (`drop_pages`), so what one batch of generations wrote does
  not stay resident through the embedding work after it.
"""
from __future__ import annotations

import ctypes
import math
import mmap

import numpy as np
import torch

from .malloc import libc

HUGE_PAGE = 2 << 20


def mapped_zeros(shape: tuple, dtype: torch.dtype, huge_pages: bool = False) -> torch.Tensor:
    """A zeroed CPU tensor on its own anonymous map (the tensor holds the map). huge_pages
    aligns it to 2 MiB and advises the kernel to back it with huge pages where it can."""
    n = math.prod(shape) * dtype.itemsize
    if n == 0:
        return torch.zeros(shape, dtype=dtype)
    pad = HUGE_PAGE if huge_pages else 0  # room to start on a 2 MiB boundary; never touched
    if hasattr(mmap, "MAP_PRIVATE"):  # POSIX: private (a shared map would be shmem, without THP)
        m = mmap.mmap(-1, n + pad, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    else:
        m = mmap.mmap(-1, n + pad)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):  # Linux; a no-op where THP is "never"
        m.madvise(mmap.MADV_HUGEPAGE)
    buf = np.frombuffer(m, dtype=np.uint8)  # the array holds the map, the tensor the array
    start = -buf.ctypes.data % HUGE_PAGE if huge_pages else 0
    return torch.from_numpy(buf[start: start + n]).view(dtype).view(shape)


_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def drop_pages(t: torch.Tensor) -> bool:
    """Hand the whole pages under a mapped_zeros tensor back to the OS (MADV_DONTNEED: a
    private anonymous map reads as zeros again and takes no memory until written). False,
    changing nothing, where the OS has no madvise."""
    c = libc()
    if _MADV_DONTNEED is None or c is None or t.device.type != "cpu":
        return False
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end <= start:
        return True
    if c.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")
    return True
