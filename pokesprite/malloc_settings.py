"""C allocator (glibc malloc) settings for pokesprite's own commands (a DVC stage, ``pokesprite ...``).

With glibc's defaults a freed block goes back to the operating system as soon as it is large enough:
a block of 32 MiB or more is its own mapping, unmapped when freed, and free memory at the top of the
heap is trimmed. A training step allocates and frees the same large activations every time (the
VAE's 216 px feature maps are 24-48 MiB at batch 8), so every step the kernel maps fresh pages and
zeroes them again. For the VAE at params.yaml's sizes that was about 284,000 page faults and 1.2 s
of system time in a 3.3 s step on 2 cores (``benchmarks/malloc_settings.py`` measures it).

``for_commands`` keeps freed memory in the process for reuse instead, in the process that calls it
only (importing pokesprite as a library changes nothing):

* blocks below 1 GiB come from the heap rather than from mappings of their own;
* free memory at the top of the heap is kept up to 2 GiB (the largest value ``mallopt`` takes).

The process keeps that memory between steps instead of returning it, so its peak grows a little (the
VAE benchmark's: 2,074 MiB against 1,919). Other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2**31 - 1


def for_commands() -> bool:
    """Use the settings above in this process; True when they took (glibc), False elsewhere."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
