"""SGLang adapter tests: real SGLang 0.5.21 model classes on CPU (shims: sgl_shims.py).

Run in the SGLang environment: `/work/venv-sglang/bin/python -m pytest tests/sglang -q`.
The core session has no SGLang: there every test file of this folder is reported as skipped,
with the reason, and nothing here imports SGLang.
"""
from __future__ import annotations

import importlib.util

import pytest

REASON = ("SGLang is not installed: tests/sglang runs in the SGLang session "
          "(torch 2.13.0 CPU + sglang 0.5.21 --no-deps, see tests/sglang/README.md)")


def _have_sglang() -> bool:
    # This folder is itself named `sglang`: only the real package has `sglang.srt`.
    try:
        return importlib.util.find_spec("sglang.srt") is not None
    except ImportError:
        return False


if _have_sglang():
    import sgl_shims  # this folder is on sys.path; the shims must run before any sglang import

    sgl_shims.apply()
    from sgl_fixtures import family, model_config  # noqa: E402,F401  (fixtures)
else:
    class _SkippedFile(pytest.File):
        def collect(self):
            raise pytest.skip.Exception(REASON, allow_module_level=True)

    def pytest_pycollect_makemodule(module_path, parent):
        return _SkippedFile.from_parent(parent, path=module_path)
