"""GPU memory a load leaves allocated, and its peak: the figures "weights held vs the plan" and
"peak during load vs final" are measured with (the allocator's own counters, not our sums)."""
from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType


@dataclass
class DeviceMemory:
    """`with DeviceMemory() as m: load()` -> m.held_bytes, m.peak_bytes (None without CUDA).

    Both are relative to the allocation at entry, so the engine's earlier allocations (none
    before weights, in vLLM and SGLang) do not count; the peak counter is reset at entry."""

    held_bytes: int | None = None
    peak_bytes: int | None = None
    _start: int = 0

    def __enter__(self) -> "DeviceMemory":
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        import torch
        if exc_type is None and torch.cuda.is_available():
            torch.cuda.synchronize()
            self.held_bytes = torch.cuda.memory_allocated() - self._start
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
