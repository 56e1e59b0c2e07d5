"""The transformers reference of a plan: what engine outputs are compared with."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from mixload.core import config, reference
from mixload.core.convert import convert
from mixload.core.plan import build_plan

from conftest import write_yaml
from test_convert import COMMON, write_checkpoint


@pytest.fixture(scope="module")
def moe_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ref")
    cfg = Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                         architectures=["Qwen3MoeForCausalLM"])
    write_checkpoint(root / "bf16", cfg)
    convert(root / "bf16", root / "gptq", "gptq-int4")
    return {"bf16": root / "bf16", "gptq": root / "gptq"}


def _plan(family: dict[str, Path], tmp: Path, rules: list[dict]) -> object:
    return build_plan(config.load(write_yaml(tmp / "mix.yaml", {
        "sources": {k: str(v) for k, v in family.items()}, "base": "bf16", "rules": rules})))


def test_all_bf16_plan_is_the_checkpoint_itself(moe_family: dict[str, Path], tmp_path: Path) -> None:
    ref = reference.reference_model(_plan(moe_family, tmp_path, []))
    original = AutoModelForCausalLM.from_pretrained(moe_family["bf16"], dtype=torch.float32)
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, original(ids).logits)


def test_int4_experts_are_dequantized_in_place(moe_family: dict[str, Path], tmp_path: Path) -> None:
    plan = _plan(moe_family, tmp_path, [{"match": "*.mlp.experts.*", "use": "gptq"}])
    weights = reference.dequantized_weights(plan)
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    a = plan.by_name()[name.removesuffix(".weight")]
    assert a.format.label() == "gptq-int4-g128" and weights[name].shape == (256, 128)
    ref = reference.reference_model(plan)
    # the reference really runs the dequantized experts: its parameters hold them
    fused = dict(ref.named_parameters())["model.layers.1.mlp.experts.down_proj"]
    assert torch.equal(fused[2], weights[name])
    ids = torch.arange(1, 200).unsqueeze(0)
    assert 1 < reference.perplexity(ref, ids[0], window=64) < 1e4
