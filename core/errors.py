"""One exception hierarchy. Every message names what is wrong, where, and how to fix it."""
from __future__ import annotations


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
