"""glibc's heap set up for tensors that come and go at every step of a trial on the CPU.

glibc serves an allocation above its mmap threshold with a fresh mapping and unmaps it on free, so the next tensor of
that size page-faults on every page it touches. The threshold starts at 128 KiB and rises with the largest block
freed so far, so how often a process maps memory depends on the sizes it happened to free first: a tiny trial made
330,000-410,000 page faults (0.6 s of system time and 14% of its training wall) when its largest early blocks were
4 MiB. `keep_freed_memory()` fixes the threshold at glibc's largest (32 MiB) and keeps freed memory at the top of the
heap for reuse (trim threshold 1 GiB): the same trial then makes about 300 page faults, with the same peak resident
memory (benchmarks/RESULTS.md). A trial process holds its working set for its whole life anyway. Elsewhere than
glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt parameters (glibc's malloc.h)."""

MMAP_THRESHOLD = 32 * 2**20
"""Blocks up to this size come from the heap: glibc's largest accepted value on 64-bit."""
TRIM_THRESHOLD = 2**30
"""Free memory at the top of the heap up to this size stays mapped."""


@functools.cache
def keep_freed_memory() -> bool:
    """Set this process's glibc malloc thresholds (once); says whether glibc accepted them."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
