"""Stream exactly the planned tensors of a plan to an engine, and see which ones it took.

Backend-neutral: an adapter feeds `stream(plan)` to its model's own weight loading, inside a
`Consumption` that records which streamed tensors reached a parameter; `audit` judges the result.
"""
from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import lock
from .errors import SourceError
from .formats.base import torch_dtype
from .hub import check_cached
from .plan import Assignment, Plan
from .sources import TensorInfo

Tensor = torch.Tensor
SPARSE_USE = 0.5   # below this share of a file's bytes, the file is read without read-ahead


@dataclass
class ReadStats:
    """What `stream` read: tensor bytes per file (safetensors headers are not counted)."""

    tensors: int = 0
    bytes_read: int = 0
    by_file: dict[str, int] = field(default_factory=dict)
    files_opened: int = 0


def planned_tensors(plan: Plan) -> dict[Path, list[TensorInfo]]:
    """Every planned tensor, grouped by file and in file order (sequential reads)."""
    by_file: dict[Path, list[TensorInfo]] = defaultdict(list)
    for a in plan.assignments:
        for t in a.tensors.values():
            by_file[t.file].append(t)
    return {f: sorted(ts, key=lambda t: t.begin) for f, ts in by_file.items()}


def local_plan(plan: Plan, experts: Mapping[str, set[int]]) -> Plan:
    """The part of a plan one expert-parallel rank loads: of each MoE layer named in `experts`
    (layer -> the experts this rank holds) only those experts, so the rest is never read."""
    def held(a: Assignment) -> bool:
        local = experts.get(a.module.group)
        return a.module.expert is None or local is None or a.module.expert in local

    rows = [a for a in plan.assignments if held(a)]
    if len(rows) == len(plan.assignments):
        return plan
    return dataclasses.replace(plan, assignments=rows)


def planned_bytes(plan: Plan) -> int:
    return sum(a.nbytes for a in plan.assignments)


def stream(plan: Plan, stats: ReadStats | None = None,
           hashes: Mapping[str, str] | None = None) -> Iterator[tuple[str, Tensor]]:
    """(checkpoint name, tensor) for exactly the planned tensors: each file is opened once and
    only the planned tensors' bytes are read from it, in file order, one read per tensor.

    With `hashes` (tensor name -> digest: a `mixload build --lock` folder's, from lock.verify)
    each tensor's bytes are hashed as read, and one that changed since the build is refused
    (SourceError) before the engine gets it."""
    for info, buf in _buffers(plan, stats):
        if hashes is not None:
            lock.check_content(info, buf, hashes[info.name])
        yield info.name, _tensor(info, buf)


def content_hashes(plan: Plan) -> dict[str, str]:
    """Tensor name -> digest of its bytes, read as `stream` reads them (`mixload build --lock`)."""
    return {info.name: lock.digest(buf) for info, buf in _buffers(plan)}


def _buffers(plan: Plan, stats: ReadStats | None = None) -> Iterator[tuple[TensorInfo, bytearray]]:
    check_cached(plan)   # a hub source planned online may not be fetched yet: say which command
    stats = stats if stats is not None else ReadStats()
    for file, infos in planned_tensors(plan).items():
        fd = os.open(file, os.O_RDONLY)
        try:
            stats.files_opened += 1
            # Read-ahead around each read pulled whole shards from disk when a plan takes a few
            # tensors of them (measured: 3 MB planned of a 16 MB shard read all 16 MB; at real
            # width, attention from a BF16 shard of experts read 10 % more than planned).
            wanted = sum(info.nbytes for info in infos)
            sparse = wanted < SPARSE_USE * os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM if sparse else os.POSIX_FADV_SEQUENTIAL)
            for info in infos:
                buf = _read(fd, file, info)
                stats.tensors += 1
                stats.bytes_read += info.nbytes
                stats.by_file[str(file)] = stats.by_file.get(str(file), 0) + info.nbytes
                yield info, buf
        finally:
            os.close(fd)


def _read(fd: int, file: Path, info: TensorInfo) -> bytearray:
    """One tensor's bytes (pread: no mapping whose page faults read around them)."""
    buf = bytearray(info.nbytes)
    view, got = memoryview(buf), 0
    while got < info.nbytes:
        n = os.preadv(fd, [view[got:]], info.begin + got)
        if n == 0:
            raise SourceError(f"the file ends inside tensor {info.name}", file=file,
                              tensor=info.name, fix="the shard is truncated: re-download it")
        got += n
    return buf


def _tensor(info: TensorInfo, buf: bytearray) -> Tensor:
    dtype = torch_dtype(info.dtype)
    if not buf:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(info.shape)


def _tensors(items: Iterable[Any]) -> Iterator[Tensor]:
    """The tensors among aten arguments or results: tensors, or lists/tuples of them (aten's
    only containers; pytree's general walk cost more than the rest of the hook per op)."""
    for x in items:
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (tuple, list)):
            yield from (t for t in x if isinstance(t, torch.Tensor))


def _storage(t: Tensor) -> int | None:
    """The address of a dense tensor's storage (shared by all its views); None if it has none."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):   # meta, sparse and other storage-less tensors
        return None
    return ptr or None   # empty tensors all sit at 0


class Consumption(TorchDispatchMode):
    """Records which streamed tensors an engine wrote into its parameters.

    Engines reshape checkpoint tensors on the way in (narrow for TP, cat, transpose, cast), so
    identity is not enough: every op's outputs inherit the checkpoint names of its inputs, and
    an op that writes into a parameter's storage marks those names consumed. A tensor the
    engine drops on the floor (an unknown name, a suffix it ignores) is never marked.
    """

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        super().__init__()
        self._params = {ptr: name for name, p in params.items()
                        if (ptr := _storage(p)) is not None}
        self._origin: dict[int, frozenset[str]] = {}
        #: checkpoint tensor -> the parameters it was written into
        self.consumed: dict[str, set[str]] = defaultdict(set)

    def watch(self, stream: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        """Pass a (name, tensor) stream through, remembering each tensor's name."""
        for name, tensor in stream:
            ptr = _storage(tensor)
            if ptr is not None:
                self._origin[ptr] = frozenset({name})
            yield name, tensor

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        names = frozenset().union(*(self._origin.get(_storage(t), ())
                                    for t in _tensors((*args, *kwargs.values()))))
        schema = getattr(func, "_schema", None)
        written = [a for a, spec in zip(args, schema.arguments if schema else ())
                   if isinstance(a, torch.Tensor) and spec.alias_info is not None
                   and spec.alias_info.is_write]
        outputs = list(_tensors(out if isinstance(out, (tuple, list)) else (out,)))
        for t in outputs:
            ptr = _storage(t)
            if ptr is None or ptr in self._params:
                continue
            # A fresh allocation may reuse a freed tensor's address: always overwrite.
            if names:
                self._origin[ptr] = names
            else:
                self._origin.pop(ptr, None)
        if names:
            targets = {self._params[p] for p in map(_storage, written + outputs)
                       if p in self._params}
            for name in names if targets else ():
                self.consumed[name] |= targets
        return out
