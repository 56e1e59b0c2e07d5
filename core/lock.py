"""What a `mixload build` folder knows of its checkpoints' content, and the check at every load.

The plan's fingerprint covers the layout (file, offsets, dtype, shape), not the bytes: a
checkpoint re-converted in place with the same layout keeps it. So the folder also holds
- `files.json` (always): each planned file's size and mtime, compared at every load (a stat
  per file, so free);
- `lock.json` (`mixload build --lock`): each planned tensor's source, file, offsets and content
  hash. The loader hashes the bytes it streams anyway (core/stream.py: no second read) and
  refuses a tensor whose bytes differ, even when its file's size and mtime were put back.

The hash is XXH3-128: ~24 GB/s on one core where sha256 does ~1.2 and blake2b ~0.6
(docs/results/content-check.md). It is no defence against a deliberate edit — whoever can rewrite
a checkpoint can usually rewrite lock.json too — but against an accidental re-conversion, a
partial copy or bit rot it misses one change in 2^128.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import xxhash

from .errors import SourceError
from .plan import Plan
from .sources import TensorInfo

FILES = "files.json"
LOCK = "lock.json"
HASH = "xxh3-128"
REBUILD = "run `mixload build` again for this folder (then the engine loads the new bytes), or " \
          "restore the checkpoint as it was at build time"


def digest(data: Any) -> str:
    """The content hash of a tensor's bytes (any buffer)."""
    return xxhash.xxh3_128_hexdigest(data)


def record(plan: Plan, folder: Path, hashes: Mapping[str, str] | None = None) -> None:
    """Record the planned files' size and mtime in `folder`, and with `hashes` (tensor name ->
    digest of its bytes) the lockfile."""
    files = {}
    for f in sorted(_files(plan), key=str):
        st = f.stat()
        files[str(f)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _dump(folder / FILES, {"files": files})
    if hashes is not None:
        tensors = {t.name: {"source": a.source, "file": str(t.file), "begin": t.begin,
                            "end": t.end, "hash": hashes[t.name]}
                   for a in plan.assignments for t in a.tensors.values()}
        _dump(folder / LOCK, {"hash": HASH, "tensors": tensors})


def verify(plan: Plan, folder: str | Path) -> dict[str, str] | None:
    """Refuse a load whose planned files changed size or mtime since `mixload build`; return the
    tensor hashes the stream must match if the folder was built with --lock, else None.

    A folder without the record (not a build folder, or built before mixload wrote one) checks
    nothing: it loads as it always did."""
    folder = Path(folder)
    if (folder / FILES).exists():
        recorded = _table(_read(folder / FILES), "files", folder / FILES)
        for f in sorted(_files(plan), key=str):
            _check_stat(f, recorded.get(str(f)), folder / FILES)
    if not (folder / LOCK).exists():
        return None
    lock = _read(folder / LOCK)
    if lock.get("hash") != HASH:
        raise SourceError(f"the lockfile's hash is {lock.get('hash')!r}, this mixload checks "
                          f"{HASH}", file=folder / LOCK, fix="run `mixload build --lock` again")
    locked = _table(lock, "tensors", folder / LOCK)
    hashes = {}
    for a in plan.assignments:
        for t in a.tensors.values():
            entry = locked.get(t.name)
            if not isinstance(entry, dict) or (entry.get("file"), entry.get("begin"),
                                               entry.get("end")) != (str(t.file), t.begin, t.end):
                raise SourceError("the lockfile does not cover this planned tensor where the plan "
                                  "reads it", file=folder / LOCK, tensor=t.name,
                                  fix="run `mixload build --lock` again")
            hashes[t.name] = str(entry.get("hash"))
    return hashes


def check_content(info: TensorInfo, data: Any, expected: str) -> None:
    """Refuse a streamed tensor whose bytes are not the ones locked at build time."""
    if digest(data) != expected:
        raise SourceError(f"tensor {info.name} is not what `mixload build --lock` hashed (bytes "
                          f"{info.begin}-{info.end} changed since the build)",
                          file=info.file, tensor=info.name, fix=REBUILD)


def _files(plan: Plan) -> set[Path]:
    return {t.file for a in plan.assignments for t in a.tensors.values()}


def _check_stat(f: Path, recorded: Any, record: Path) -> None:
    if not isinstance(recorded, dict):
        raise SourceError(f"the build record {record.name} does not list this planned file",
                          file=f, fix="run `mixload build` again for this folder")
    st = f.stat()
    changed = []
    if st.st_size != recorded.get("size"):
        changed.append(f"size {recorded.get('size')} -> {st.st_size} bytes")
    if st.st_mtime_ns != recorded.get("mtime_ns"):
        changed.append(f"mtime {_when(recorded.get('mtime_ns'))} -> {_when(st.st_mtime_ns)}")
    if changed:
        raise SourceError(f"a planned checkpoint file changed since `mixload build` "
                          f"({'; '.join(changed)})", file=f, fix=REBUILD)


def _when(ns: Any) -> str:
    if not isinstance(ns, int):
        return repr(ns)
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat(timespec="microseconds")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"the build record is not JSON: {exc}", file=path,
                          fix="run `mixload build` again for this folder") from None
    return data if isinstance(data, dict) else {}


def _table(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    table = data.get(key)
    if not isinstance(table, dict):
        raise SourceError(f"the build record has no {key!r} table", file=path,
                          fix="run `mixload build` again for this folder")
    return table


def _dump(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
