"""glibc's malloc thresholds for trial processes (tune_lfm/heap.py): a freed 20 MiB block's pages are reused by the
next one, where glibc's defaults give them back and the next block faults on every page again (what a tiny trial's
tensors did 330,000 times per trial; benchmarks/RESULTS.md)."""

import subprocess
import sys

SCRIPT = """
import ctypes, resource, sys
from tune_lfm.heap import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def step():  # a step's activations: 20 MiB written, then freed
    block = libc.malloc(20 * 2**20)
    ctypes.memset(block, 1, 20 * 2**20)
    libc.free(block)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout)


def test_a_kept_heap_reuses_freed_pages_where_glibc_gives_them_back():
    default, kept = page_faults("default"), page_faults("kept")
    assert default > 4000, default  # a fault per 4 KiB page of the second block
    assert kept < 100, kept
