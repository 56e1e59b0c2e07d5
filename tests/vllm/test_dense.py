"""A dense model served in mixed precision through vLLM: BF16, GPTQ-int4 and AWQ-int4 linears
mixed per layer (rule form). vLLM's greedy tokens equal those of transformers running the same
plan's dequantized weights."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import vllm_support as vs
from vllm import LLM

from mixload.adapters.vllm.loader import LoadReport, report_of
from mixload.core.plan import Plan

pytestmark = vs.needs_int4_linear

MIX = {"sources": {"bf16": "{bf16}", "gptq": "{gptq}", "awq": "{awq}"},
       "base": "bf16",
       "rules": [{"match": "model.layers.0.self_attn.*", "use": "gptq"},
                 {"match": "model.layers.0.mlp.*", "use": "awq"},
                 {"match": "model.layers.1.self_attn.*", "use": "awq"},
                 {"match": "model.layers.1.mlp.down_proj", "use": "gptq"}]}


@pytest.fixture(scope="module")
def served(dense: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[LLM, Plan]]:
    yield from vs.serve(MIX, dense, tmp_path_factory.mktemp("dense-mix"))


def test_greedy_tokens_equal_the_reference(served: tuple[LLM, Plan]) -> None:
    llm, plan = served
    vs.assert_greedy_matches_reference(vs.greedy(llm), plan)


def test_reads_and_holds_exactly_the_plan(served: tuple[LLM, Plan]) -> None:
    llm, plan = served
    (report,) = llm.apply_model(report_of)
    vs.assert_report(report, plan)
    assert isinstance(report, LoadReport) and report.files_opened == 3
