"""glibc's allocator, told to keep freed memory for reuse: what LCM_HOLD_MEMORY switches on (lcm.accel)."""

from __future__ import annotations

import ctypes
import functools
import platform
from typing import Optional

# glibc's mallopt parameters (malloc.h) and thresholds, in bytes
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
HELD_MMAP_THRESHOLD = 2**30  # buffers under 1 GiB come from the heap, where freed ones are reused
HELD_TRIM_THRESHOLD = 2**31 - 1  # mallopt's largest value: freed heap stays with the process
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # where glibc's own sliding threshold stops on 64-bit systems


@functools.cache
def glibc() -> Optional[ctypes.CDLL]:
    """The process's C library where it is glibc (mallopt and malloc_trim), else None (macOS, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)  # the symbols already loaded into this process, glibc's among them
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def hold_freed_memory(on: bool) -> bool:
    """Make glibc keep and reuse freed memory (on), or behave as a default process does (off).

    By default glibc maps every buffer of 32 MiB or more afresh and unmaps it when freed, and gives
    the free top of its heap back to the kernel; new pages are then zero-filled one fault at a time
    on first touch. A CPU request allocates gigabytes of activations, about 600,000 page faults per
    UNet pass and VAE decode at 256x256, and holding the memory makes both faster (bench/RESULTS.md,
    "holding freed memory"). The price: the process keeps its peak working set between requests.
    The thresholds hold only in the main arena: a thread's own arena serves buffers over 64 MiB
    from fresh mappings and unmaps a heap that falls wholly free, whatever they say (an engine thread
    in an arena of its own lost most of the gain, bench/RESULTS.md). So on also makes threads started
    from now on share the arenas that exist (M_ARENA_MAX=1, as MALLOC_ARENA_MAX=1 would at process
    start): call it before the engine thread starts, and the engine thread gets the main arena.
    That cannot be undone in the process; off restores the thresholds only: glibc's sliding
    threshold where it settles once large buffers have been freed, with the held memory given back.
    Returns False, changing nothing, where the C library is not glibc.
    """
    libc = glibc()
    if libc is None:
        return False
    if on:
        mmap, trim = HELD_MMAP_THRESHOLD, HELD_TRIM_THRESHOLD
        libc.mallopt(M_ARENA_MAX, 1)
    else:
        mmap, trim = GLIBC_MMAP_THRESHOLD_MAX, 2 * GLIBC_MMAP_THRESHOLD_MAX
    done = libc.mallopt(M_MMAP_THRESHOLD, mmap) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim) == 1
    if not on:
        libc.malloc_trim(0)
    return done
