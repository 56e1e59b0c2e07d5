"""A MoE model from the seed form of the YAML, served through vLLM: BF16 experts, GPTQ-int4
attention in layer 0 and AWQ-int4 attention in layer 1. As in the seed's own examples one expert
is mapped to int4: vLLM runs one method per MoE layer, so the seed form's default
(on_conflict: promote) keeps that layer's experts in BF16 and says so."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import vllm_support as vs
from vllm import LLM

from mixload.adapters.vllm.loader import report_of
from mixload.core.plan import Plan

pytestmark = vs.needs_int4_linear

SEED = {"mixed_precision": {
    "fp16_path": "{bf16}",
    "gptq_int4_path": "{gptq}",
    "awq_int4_path": "{awq}",
    "base_model_path": "{bf16}",
    "weight_mapping": {
        "model.layers.0.self_attn.qkv_proj.weight": "gptq_int4",
        "model.layers.0.self_attn.o_proj.weight": "gptq_int4",
        "model.layers.1.self_attn.q_proj.weight": "awq_int4",
        "model.layers.1.self_attn.k_proj.weight": "awq_int4",
        "model.layers.1.self_attn.v_proj.weight": "awq_int4",
        "model.layers.1.self_attn.o_proj.weight": "awq_int4",
        "model.layers.0.mlp.experts.0.down_proj.weight": "gptq_int4"}}}


@pytest.fixture(scope="module")
def served(moe: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[LLM, Plan]]:
    yield from vs.serve(SEED, moe, tmp_path_factory.mktemp("moe-seed"), "seed.yaml")


def test_plan_keeps_split_experts_in_bf16(served: tuple[LLM, Plan]) -> None:
    _, plan = served
    formats = {a.module.group: a.format.label() for a in plan.assignments}
    assert formats["model.layers.0.self_attn.qkv_proj"] == "gptq-int4-g128"
    assert formats["model.layers.1.self_attn.o_proj"] == "awq-int4-g128"
    assert formats["model.layers.0.mlp.experts"] == formats["model.layers.1.mlp.experts"] == "bf16"
    (warning,) = [w for w in plan.warnings if "experts" in w]
    assert warning.startswith("model.layers.0.mlp.experts: split") and "promoted to fp16" in warning


def test_greedy_tokens_equal_the_reference(served: tuple[LLM, Plan]) -> None:
    llm, plan = served
    vs.assert_greedy_matches_reference(vs.greedy(llm), plan)


def test_reads_and_holds_exactly_the_plan(served: tuple[LLM, Plan]) -> None:
    llm, plan = served
    (report,) = llm.apply_model(report_of)
    vs.assert_report(report, plan)
