"""What reading a checkpoint costs in disk reads: drop its files from the page cache, then count
the pages a load brought back (mincore). Used by the load benchmark and the streaming test."""
from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable
from pathlib import Path


def evict(files: Iterable[Path]) -> None:
    """Drop the files' clean pages (dirty ones stay until written back: sync first)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: Iterable[Path]) -> int:
    """Bytes of the files now in the page cache (mincore over a mapping of each file)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page, total = mmap.PAGESIZE, 0
    for f in files:
        size = os.path.getsize(f)
        if size == 0:
            continue
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            try:
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore failed on {f}")
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += sum(v & 1 for v in vec) * page
    return total
