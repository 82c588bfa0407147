"""How freed memory goes back to the OS during a memory-bound run (glibc malloc; a no-op elsewhere).

glibc serves allocations below its mmap threshold from heaps and keeps what is freed there for reuse. Its
threshold also grows with the largest block freed (up to 32 MiB), so a training step's many short-lived
activation and dequantization buffers (1-100 MiB) end up in the heap, where freed holes between live blocks
are never returned: the process's private memory creeps up by hundreds of MiB above what is alive (measured
on the 1B shape of bench/big_model.py, QLoRA: live ~1.1 GiB, RssAnon 1.7 GiB after two steps).

`return_freed_memory_promptly()` fixes the threshold at 1 MiB: every larger block is its own mapping, unmapped
when freed, so the peak follows what is alive. The price is page faults on each fresh large buffer (a few
percent of a QLoRA step on this CPU: bench/big_model.py records the step time with it on). lorakit turns it
on for quantized runs (the ones whose point is memory).
"""
from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def return_freed_memory_promptly(threshold: int = THRESHOLD) -> bool:
    """Returns True after setting glibc's mmap threshold to `threshold` bytes (see the module docstring);
    False where the C library is not glibc (nothing changed)."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)) == 1
    libc.malloc_trim(ctypes.c_size_t(0))
    return ok
