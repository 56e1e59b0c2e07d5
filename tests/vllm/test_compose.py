"""Two BF16 checkpoints of one architecture composed layer by layer and served through vLLM.
No quantized kernel runs, so this end-to-end check runs on every CPU vLLM supports."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import vllm_support as vs
from vllm import LLM

from mixload.adapters.vllm.loader import report_of
from mixload.core.plan import Plan

MIX = {"sources": {"a": "{bf16}", "b": "{bf16-b}"},
       "base": "a",
       "rules": [{"match": "model.layers.1.*", "use": "b"},
                 {"match": "lm_head", "use": "b"}]}


@pytest.fixture(scope="module")
def served(dense: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[LLM, Plan]]:
    yield from vs.serve(MIX, dense, tmp_path_factory.mktemp("bf16-mix"))


def test_greedy_tokens_equal_the_reference(served: tuple[LLM, Plan]) -> None:
    llm, plan = served
    assert {a.source for a in plan.assignments} == {"a", "b"}
    vs.assert_greedy_matches_reference(vs.greedy(llm), plan)


def test_reads_and_holds_exactly_the_plan(served: tuple[LLM, Plan]) -> None:
    llm, plan = served
    (report,) = llm.apply_model(report_of)
    vs.assert_report(report, plan)
    assert report.redundant_bytes == 0


def test_a_bf16_mix_runs_in_float32_where_the_cpu_has_no_bf16(dense: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """AVX2-only CPUs compute bf16 ~50x slower than fp32: vLLM must accept --dtype float32."""
    from mixload.core.build import build

    folder = build(vs.write_mix(tmp_path / "mix.yaml", vs.fill(MIX, dense)), tmp_path / "model")
    assert str(vs.engine_config(folder, dtype="float32").model_config.dtype) == "torch.float32"
