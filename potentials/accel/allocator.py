"""Process-wide allocator settings for CPU runs: glibc keeps freed memory for reuse.

Why.  A forward and backward pass on a few hundred atoms allocates and frees tensors of tens to hundreds of MB
every step.  glibc serves each allocation above 128 kB (at most 32 MB) with a fresh ``mmap`` and gives it back to
the kernel on ``free``; the next step's tensor then starts on new pages, which the kernel zeroes on first touch, a
page fault per 4 kB page.  :func:`tune_allocator` asks glibc to serve large blocks from its heap and to keep freed
memory there, so the pages are reused: no faults after the first step.  (Threads other than the main one allocate
from their own arenas, where glibc still maps blocks above 64 MB afresh; PyTorch's CPU operators allocate their
outputs in the calling, usually main, thread.)

The cost is memory: the process keeps its peak instead of returning it between steps — what a caching allocator
(PyTorch's on CUDA, jemalloc, tcmalloc) does as well — plus fragmentation.  ``POTENTIALS_MALLOC=system`` leaves
glibc's defaults alone.  The same tuning from outside a process: ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=67108864`` (the benchmark harness sets these for every
framework's worker).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4

#: (parameter, environment variable, value): no mmap for large blocks; keep up to 2 GB of free heap top; grow the
#: heap 64 MB at a time
GLIBC_SETTINGS = (
    (_M_MMAP_MAX, "MALLOC_MMAP_MAX_", 0),
    (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 2**31 - 1),
    (_M_TOP_PAD, "MALLOC_TOP_PAD_", 64 << 20),
)

#: the same settings as environment variables (read by glibc when a process starts)
GLIBC_ENV = {name: str(value) for _, name, value in GLIBC_SETTINGS}

_done: bool | None = None


def tune_allocator() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); True if the settings were applied.

    Does nothing (and returns False) off Linux, with another C library, or when ``POTENTIALS_MALLOC=system``.
    Safe to call more than once: the first call decides.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("POTENTIALS_MALLOC", "tuned").lower() == "system" or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has no mallopt parameters of these meanings  # noqa: B018
    except (OSError, AttributeError):
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(param, value) == 1 for param, _, value in GLIBC_SETTINGS)
    return _done
