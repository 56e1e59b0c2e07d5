"""Shared fixtures: header-only checkpoint families (real shapes, no disk, no download)."""
from __future__ import annotations

from pathlib import Path

import os

import pytest
import yaml
from hypothesis import settings

# The fuzz tests draw the same examples every run, so a CI run is red only for a change, never
# for a lucky draw; HYPOTHESIS_RANDOM=1 explores new ones (run it when touching a parser).
settings.register_profile("fixed", derandomize=True)
settings.register_profile("random", derandomize=False)
settings.load_profile("random" if os.environ.get("HYPOTHESIS_RANDOM") else "fixed")

from mixload.core import header_only
from mixload.core.formats import Fp8, Gptq

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# A small Qwen3-MoE with every linear dim a multiple of 128 (fast to plan, real layout).
SMALL_MOE = {**header_only.QWEN3_30B_A3B, "hidden_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
             "intermediate_size": 512, "moe_intermediate_size": 256, "num_experts": 4,
             "num_experts_per_tok": 2, "vocab_size": 1024}


@pytest.fixture(scope="session")
def qwen3_30b(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Header-only Qwen3-30B-A3B as BF16, FP8-block and GPTQ-int4 siblings (sparse files)."""
    root = tmp_path_factory.mktemp("qwen3-30b-a3b")
    return header_only.write_family(root, header_only.QWEN3_30B_A3B,
                                    {"bf16": None, "fp8": Fp8(), "gptq": Gptq()})


@pytest.fixture
def small_moe(tmp_path: Path) -> dict[str, Path]:
    """A fresh (mutable) small header-only MoE family per test."""
    return header_only.write_family(tmp_path / "small", SMALL_MOE,
                                    {"bf16": None, "fp8": Fp8(), "gptq": Gptq()})


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mixload cache for the session: the tiny family is built into it once (~1.5 min)."""
    return tmp_path_factory.mktemp("mixload-cache")


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def seed_yaml(name: str, paths: dict[str, Path], out: Path) -> Path:
    """A seed document's YAML with only its placeholder paths pointed at local checkpoints."""
    text = (CONFIGS / "seed" / name).read_text(encoding="utf-8")
    for placeholder, real in paths.items():
        text = text.replace(f'"{placeholder}"', f'"{real}"')
    out.write_text(text, encoding="utf-8")
    return out
