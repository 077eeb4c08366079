"""Keep glibc from handing XLA's large CPU buffers back to the kernel after every step.

XLA's CPU runtime allocates each executable's temporaries with malloc on every run. glibc serves
anything over 32 MB (its largest mmap threshold) with a fresh mmap and unmaps it on free, so
every train step page-faults its whole temporary space in again: ~115,000 faults and 0.17 s of
system time per step for the `tiny` preset (450 MB of temporaries), a quarter of the step.
Serving every allocation from one arena's heap and never trimming it makes the second step reuse
the first step's pages, as tcmalloc would (measured the same; see BUILD_NOTES "Speed").

`tune()` runs when mdm_jax is imported, before jax allocates. Memory is then kept at its peak
for the life of the process, which is what a training or inference process wants. A process
that alternates two programs with large temporaries (training and its evaluations) calls
`trim()` between them: without it, the second program's buffers rarely fit the first one's freed
chunks and the heap grows by their sum instead of their maximum. Set
MDM_JAX_MALLOC=system to keep glibc's defaults; nothing is done under other C libraries (musl,
macOS) or when another allocator was preloaded.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

tuned = False  # whether tune() changed the allocator in this process
_libc = None


def tune() -> bool:
    """Apply the settings once; returns whether they are in effect."""
    global tuned, _libc
    if tuned:
        return True
    if (os.environ.get("MDM_JAX_MALLOC", "") == "system" or platform.system() != "Linux"
            or platform.libc_ver()[0] != "glibc" or "malloc" in os.environ.get("LD_PRELOAD", "")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    tuned = bool(libc.mallopt(_M_MMAP_MAX, 0)            # no per-allocation mmap/munmap
                 and libc.mallopt(_M_TRIM_THRESHOLD, -1)  # never shrink the heap (-1: SIZE_MAX)
                 and libc.mallopt(_M_ARENA_MAX, 1))      # one heap: threads share freed pages
    _libc = libc if tuned else None
    return tuned


def trim() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim), where tune() keeps
    them: between two programs whose temporaries would otherwise add up. The next run of a
    program faults its temporaries in once more (about one step's worth)."""
    if _libc is not None:
        _libc.malloc_trim(0)
