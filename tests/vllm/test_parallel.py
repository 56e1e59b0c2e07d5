"""Tensor parallel 2 with expert parallelism: each rank streams the shared layers and only its
own experts, and the audit holds on both ranks. vLLM 0.30's CPU fused-MoE kernel crashes when
it runs with an expert map (a segfault in cpu_fused_moe.cpp, also for a plain BF16 checkpoint),
so on CPU this checks the load, not generation."""
from __future__ import annotations

from pathlib import Path

import vllm_support as vs

from mixload.adapters.vllm.loader import report_of
from mixload.core.build import build

pytestmark = vs.needs_int4_linear

MIX = {"sources": {"bf16": "{bf16}", "gptq": "{gptq}", "awq": "{awq}"},
       "base": "bf16",
       "rules": [{"match": "model.layers.0.self_attn.*", "use": "gptq"},
                 {"match": "model.layers.1.self_attn.*", "use": "awq"}]}


def test_each_rank_reads_its_own_experts(moe: dict[str, Path], tmp_path: Path) -> None:
    mix = vs.write_mix(tmp_path / "mix.yaml", vs.fill(MIX, moe))
    plan = vs.plan_of(mix)
    llm = vs.start(build(mix, tmp_path / "model"), tensor_parallel_size=2,
                   enable_expert_parallel=True, distributed_executor_backend="mp")
    try:
        reports = llm.apply_model(report_of)
    finally:
        vs.stop(llm)
    experts = sum(a.nbytes for a in plan.assignments if a.module.expert is not None)
    shared = sum(a.nbytes for a in plan.assignments) - experts
    assert [r.fingerprint for r in reports] == [plan.fingerprint] * 2
    assert all(r.read_bytes == r.planned_bytes == shared + experts // 2 for r in reports)
