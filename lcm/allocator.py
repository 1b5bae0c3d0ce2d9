"""The process's memory: glibc's allocator, told to keep freed memory for reuse (what LCM_HOLD_MEMORY
switches on, lcm.accel) or to give setup's garbage back, and the resident pages of mapped files."""

from __future__ import annotations

import ctypes
import functools
import gc
import platform
from pathlib import Path
from typing import Optional

# glibc's mallopt parameters (malloc.h) and thresholds, in bytes
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
HELD_MMAP_THRESHOLD = 2**30  # buffers under 1 GiB come from the heap, where freed ones are reused
HELD_TRIM_THRESHOLD = 2**31 - 1  # mallopt's largest value: freed heap stays with the process
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # where glibc's own sliding threshold stops on 64-bit systems
MADV_DONTNEED = 4  # madvise's advice (sys/mman.h): drop the range's pages from the process


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


def give_back() -> bool:
    """Collect Python's garbage, and give every free page of glibc's heap back to the kernel now
    (malloc_trim), held or not.

    Setup frees gigabytes as it loads: the checkpoint's fp16 tensors cast to the engine's dtype,
    weights copied to channels_last, the upsamplers folded. Held (LCM_HOLD_MEMORY), that garbage
    stayed resident: 1.7 GB of the 9.0 GB an fp32 setup of the full checkpoint held (bench/RESULTS.md,
    "Setup's garbage"). A request's own buffers are held again once it has run: the first request
    faults them in (in fp32 at 512 px, 22.2 s against 19.3 for the next ones; 21.7 against 19.2
    without this). Compiling with OpenVINO gives the free heap back too: with or without this call,
    its bf16 setup held 5.9 GB, so what compiling frees needs no second call.
    Returns False, changing nothing, where the C library is not glibc.
    """
    gc.collect()
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def drop_mapped(path: Path) -> int:
    """Drop this process's resident pages of every read-only mapping of `path`; returns the bytes mapped.

    For a file that is mapped but no longer read, as OpenVINO keeps a saved model's weights once its
    CPU plugin has copied them into its own layout (lcm.openvino_runtime). A read-only mapping's
    pages are the file's own, so a page touched again is read back from the page cache or the file:
    nothing can be lost. Linux only: 0 where /proc/self/maps or glibc's madvise is missing.
    """
    libc = glibc()
    if libc is None:
        return 0
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return 0
    target = str(Path(path).resolve())
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    dropped = 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[5] != target or "w" in fields[1]:
            continue
        low, high = (int(end, 16) for end in fields[0].split("-"))
        if libc.madvise(low, high - low, MADV_DONTNEED) == 0:
            dropped += high - low
    return dropped
