"""Test and demo environments. vLLM and SGLang pin different transformers / compressed-tensors,
so each engine gets its own session; the core session needs neither."""
from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

# The CPU wheel on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    """Core, formats, CLI and fuzz tests (CPU, no engine). Extra args go to pytest."""
    session.install(TORCH, "-e", ".[test]")
    session.run("pytest", "-m", "not gpu", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job on the embedded tiny model family: plan a mixed model of it."""
    session.install(TORCH, "-e", ".[formats]")
    session.run("mixload", "plan", "configs/tiny-moe.yaml", *session.posargs)
