"""One exception hierarchy. Every message names what is wrong, where, and how to fix it."""
from __future__ import annotations

import errno
from pathlib import Path


class MixloadError(Exception):
    """Base of every error mixload raises on bad input; the CLI turns it into exit 2."""

    def __init__(self, what: str, *, file: object = None, tensor: str | None = None,
                 rule: str | None = None, fix: str | None = None) -> None:
        self.what, self.file, self.tensor, self.rule, self.fix = what, file, tensor, rule, fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.what]
        for label, value in (("file", self.file), ("tensor", self.tensor),
                             ("rule", self.rule), ("fix", self.fix)):
            if value is not None:
                lines.append(f"  {label}: {value}")
        return "\n".join(lines)


class ConfigError(MixloadError):
    """The YAML is malformed or names something that does not exist."""


class SourceError(MixloadError):
    """A checkpoint folder is missing, unsafe, unsupported or inconsistent."""


class HeaderError(SourceError):
    """A safetensors header is truncated, malformed or lies about its data."""


class OutputError(MixloadError):
    """An output folder (`-o`) would touch a source, or replace something mixload did not make."""


class FileSystemError(MixloadError):
    """The operating system refused a read or write: disk full, read-only, no permission, a
    file where a folder should be (or the reverse)."""


class MissingDependency(MixloadError):
    """A command needs an optional dependency that is not installed (the fix names the extra)."""


# What to do about each OSError a user can cause; anything else gets the generic fix.
OS_FIXES = {
    errno.ENOSPC: "free space on that disk, or write to another one",
    errno.EDQUOT: "free space within your disk quota, or write to another disk",
    errno.EROFS: "that file system is read-only: choose a folder on a writable one",
    errno.EACCES: "you may not write there: choose another folder or change its permissions",
    errno.EPERM: "you may not write there: choose another folder or change its permissions",
    errno.EEXIST: "something else created it meanwhile: choose another path, or remove it",
    errno.ENOTEMPTY: "something else created it meanwhile: choose another path, or remove it",
    errno.EISDIR: "a folder stands where a file should be: choose another path",
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another path",
}


def os_error(exc: OSError, doing: str, file: object = None) -> FileSystemError:
    """`exc` as the typed error: what failed while `doing` what, on which file, and the fix."""
    code = errno.errorcode.get(exc.errno or 0)
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = file if file is not None else exc.filename
    return FileSystemError(f"{doing} failed: {reason}" + (f" ({code})" if code else ""),
                           file=Path(where) if isinstance(where, str) else where,
                           fix=OS_FIXES.get(exc.errno or 0, "check the path and its permissions"))


class PlanError(MixloadError):
    """The plan can't be built; carries every problem found, not just the first."""

    def __init__(self, problems: list[MixloadError]) -> None:
        self.problems = problems
        n = len(problems)
        body = "\n".join(f"[{i + 1}/{n}] {p.render()}" for i, p in enumerate(problems))
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in the plan:\n{body}")

    def render(self) -> str:  # the problems already carry file/tensor/rule/fix
        return self.what


class AuditError(MixloadError):
    """An engine did not load what the plan says (a tensor not consumed, a parameter not filled,
    a layer run in another format); carries every problem found, each naming layer and tensor."""

    def __init__(self, problems: list[MixloadError], fingerprint: str) -> None:
        self.problems = problems
        n = len(problems)
        body = "\n".join(f"[{i + 1}/{n}] {p.render()}" for i, p in enumerate(problems))
        super().__init__(f"load audit of plan {fingerprint}: {n} problem{'s' if n != 1 else ''}"
                         f"\n{body}")

    def render(self) -> str:  # the problems already carry file/tensor/rule/fix
        return self.what
