"""An output folder mixload owns: `build`, `convert` and the tiny family write through here.

- `guard`: the output, resolved (symlinks too), is not, does not contain and does not lie inside
  any source folder (that part, `apart`, is also how `fetch` checks the Hugging Face cache); an
  existing one is replaced only with `overwrite`, and only if mixload made it (it holds MARKER)
  or it is empty — never a folder of the user's.
- `write`: the folder is filled in a hidden sibling `.NAME.tmp-HOST-PID-XXXXXXXX` that holds the
  marker from the start, then renamed into place; an old one goes only once the new one is there.
  SIGINT and SIGTERM remove the temporary folder; one left by a killed run (SIGKILL, power loss)
  is removed, with a note, by the next write into the same parent folder.
- Folder modes follow the umask (mkdtemp alone makes 0700).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import OutputError, os_error

if TYPE_CHECKING:
    from .sources import Source

MARKER = ".mixload-output"
# `.NAME.tmp-HOST-PID-XXXXXXXX` (being written) and `.NAME.old-...` (being replaced); mkdtemp's
# suffix has no dash, so the last two dashes delimit the pid.
_TEMP = re.compile(r"\..+\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+")


def source_folders(src: Source) -> set[Path]:
    """Every folder a source's bytes live in: the folder, the hub cache folder of a hub source
    (its snapshot links into ../../blobs), the real folders of symlinked local shards."""
    if src.hub is not None:
        return {src.path, src.path.parent.parent}
    return {src.path} | {info.file.resolve().parent for info in src.tensors.values()}


def apart(out: str | os.PathLike[str], sources: Iterable[Path], what: str = "the output folder",
          fix: str = "choose a folder outside every source folder") -> Path:
    """`out` resolved; raises if it is, contains or lies inside one of `sources`."""
    target = Path(out).resolve()
    for folder in sorted({Path(s).resolve() for s in sources}):
        if target == folder:
            how = "is the source folder"
        elif target.is_relative_to(folder):
            how = f"lies inside the source folder {folder}"
        elif folder.is_relative_to(target):
            how = f"contains the source folder {folder}"
        else:
            continue
        raise OutputError(f"{what} {how}: mixload never writes into, replaces or deletes a "
                          "source", file=out, fix=fix)
    return target


def guard(out: str | os.PathLike[str], sources: Iterable[Path], overwrite: bool) -> Path:
    """The resolved output folder, once it is safe to write: apart from every source, new, or
    (with `overwrite`) a folder mixload made or an empty one."""
    target = apart(out, sources)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputError("the output folder already exists", file=out,
                              fix="choose another folder, or pass overwrite=True (--overwrite) "
                                  "to replace one that mixload made")
        _check_replaceable(target, out)
    return target


def write(out: Path, fill: Callable[[Path], None], made_by: str, *, replace: bool = True) -> Path:
    """`out`, filled by `fill(tmp)` in a temporary sibling and renamed into place.

    `replace`: an existing `out` is swapped out (callers `guard` first); otherwise one that
    appears meanwhile makes this raise OutputError (a racing writer won)."""
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:   # mkdir's word for "a file stands where a folder should be"
            blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), out.parent)
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(blocker)
                                     ) from None
        sweep(out.parent)
        tmp = _temp(out, "tmp")
    except OSError as exc:
        raise os_error(exc, "creating the output folder", exc.filename or out) from None
    try:
        with _signals_raise():
            (tmp / MARKER).write_text(json.dumps({"made_by": made_by}) + "\n", encoding="utf-8")
            fill(tmp)
            _swap(tmp, out, replace)
    except OSError as exc:
        name = exc.filename
        inside = name is None or Path(name).is_relative_to(tmp)
        file = out / Path(name).relative_to(tmp) if inside and name is not None else name or out
        raise os_error(exc, "writing the output folder" if inside else made_by, file) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # a no-op once renamed
    return out


def sweep(parent: Path) -> list[Path]:
    """Remove the temporary folders that killed mixload runs of this host left in `parent`
    (printing a note for each); returns them. A folder is only ever removed if it has mixload's
    name pattern, our marker (or nothing) inside, and its process is gone."""
    host = _host()
    removed = []
    for p in parent.glob(".*.*-*-*"):
        m = _TEMP.fullmatch(p.name)
        if (m is None or m["host"] != host or _alive(int(m["pid"])) or p.is_symlink()
                or not p.is_dir() or not ((p / MARKER).is_file() or not any(p.iterdir()))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        print(f"mixload: removed {p}, left by a mixload run that was killed (pid {m['pid']})",
              file=sys.stderr)
        removed.append(p)
    return removed


def _check_replaceable(target: Path, out: object) -> None:
    if target.is_symlink() or not target.is_dir():
        raise OutputError("the output path exists and is not a folder: --overwrite replaces only "
                          "a folder that mixload made", file=out,
                          fix="choose another output folder")
    if not (target / MARKER).is_file() and any(target.iterdir()):
        raise OutputError(f"the output folder exists and mixload did not make it (it has no "
                          f"{MARKER}): --overwrite replaces only folders that mixload wrote",
                          file=out, fix="choose another output folder, or remove this one "
                                        "yourself if you are sure nothing in it is needed")


def _swap(tmp: Path, out: Path, replace: bool) -> None:
    if not replace:
        if out.exists():
            raise OutputError("the output folder appeared while it was written", file=out,
                              fix="another run wrote it: use that one")
        try:
            os.rename(tmp, out)
        except OSError:
            if out.exists():
                raise OutputError("the output folder appeared while it was written", file=out,
                                  fix="another run wrote it: use that one") from None
            raise
        return
    old = None
    if out.exists() or out.is_symlink():
        _check_replaceable(out, out)          # again: it may have changed since `guard`
        old = _temp(out, "old")
    # No signal between the two renames: an interrupted swap would leave neither folder at `out`.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        if old is not None:
            os.replace(out, old)              # a folder may replace an empty one
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if old is not None:
        shutil.rmtree(old)


def _temp(out: Path, kind: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{_host()}-{os.getpid()}-",
                                dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # someone else's process
        return True
    return True


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) for the duration, so that `finally` blocks run (SIGINT
    already raises KeyboardInterrupt). Signals are handled only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
