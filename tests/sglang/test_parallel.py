"""TP=2 and EP=2 on CPU: two SGLang ranks (gloo), each loading the mix through the mixed loader.
Each rank must hold exactly its shard of every planned tensor (the format's TP split: FP8
blocks, GPTQ/AWQ groups, fused q/k/v with one KV head per rank) or its half of the experts,
and under EP it must not even read the other rank's experts."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sgl_fixtures import write_mix

RANK = Path(__file__).resolve().parent / "sgl_rank.py"


def run_group(tmp_path: Path, model: Path, mix: Path, ep: int, world: int = 2,
              **options: object) -> list[dict]:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": str(model), "mix": str(mix), "ep": ep, **options}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(RANK), str(r), str(world), str(port), str(spec),
                               str(tmp_path / f"rank{r}.json")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    results = []
    for r in range(world):
        out = tmp_path / f"rank{r}.json"
        assert out.exists(), logs[r][-3000:]
        results.append(json.loads(out.read_text()))
        assert "error" not in results[-1], results[-1].get("error")
    return results


@pytest.mark.parametrize("attention, experts", [("fp8", "gptq"), ("gptq", "awq"), ("bf16", "fp8")])
def test_tp2_each_rank_holds_its_shard_of_every_planned_tensor(family, tmp_path, attention, experts):
    moe = family["qwen3-moe"]
    mix = write_mix(tmp_path / "mix.yaml", {"base": moe["bf16"], "att": moe[attention],
                                             "exp": moe[experts]}, "base",
                    [("*.self_attn.*", "att"), ("*.mlp.experts.*", "exp")])
    ranks = run_group(tmp_path, moe["bf16"], mix, ep=1)
    for r in ranks:
        assert r["plan_tp_ep"] == [2, 1]                       # the worker planned for its TP
        assert r["audit"] == []
        assert r["bad"] == [] and r["checked"] > 20
        assert {n.rsplit(".", 1)[1] for n in r["unbacked"]} <= {"w13_g_idx_sort_indices",
                                                              "w2_g_idx_sort_indices"}
        assert r["experts"] == list(range(8)) and r["skipped"] == 0


def test_ep2_each_rank_reads_and_holds_only_its_experts(family, tmp_path):
    moe = family["qwen3-moe"]
    mix = write_mix(tmp_path / "mix.yaml", {"fp8": moe["fp8"], "int4": moe["gptq"]}, "fp8",
                    [("*.mlp.experts.*", "int4")])
    r0, r1 = run_group(tmp_path, moe["fp8"], mix, ep=2)
    assert (r0["experts"], r1["experts"]) == ([0, 1, 2, 3], [4, 5, 6, 7])
    for r in (r0, r1):
        assert r["plan_tp_ep"] == [2, 2] and r["moe_tp"] == [0, 1]
        assert r["audit"] == [] and r["bad"] == []
        # every layer's 4 other experts x 3 projections x 4 GPTQ tensors: never read
        assert r["skipped"] == r["layers"] * 4 * 3 * 4 and r["read"] > 0
    assert r0["bytes_read"] == r1["bytes_read"]


def test_tp2_gptq_experts_with_sglangs_own_parameter_shapes_fail_the_audit(family, tmp_path):
    """Why the quant config resizes two GPTQ-Marlin MoE parameters (quant_config.py,
    _fix_gptq_moe_params): with SGLang's own shapes, a TP=2 load silently rounds the int32 zero
    points to bf16 and builds w2's scales unsharded, twice this rank's shard. 0.5.21 leaves the
    other half uninitialized, 0.5.23 zero-fills it: the audit names it by size on both."""
    moe = family["qwen3-moe"]
    mix = write_mix(tmp_path / "mix.yaml", {"base": moe["bf16"], "exp": moe["gptq"]}, "base",
                    [("*.mlp.experts.*", "exp")])
    for r in run_group(tmp_path, moe["bf16"], mix, ep=1, sglang_gptq_moe_params=True):
        problems = r["audit"]
        assert ("I32 tensor was loaded into BF16 parameter model.layers.0.mlp.experts.w13_qzeros "
                "[model.layers.0.mlp.experts.0.gate_proj.qzeros]") in problems
        [oversized] = [p for p in problems if p.startswith(
            "parameter model.layers.0.mlp.experts.w2_scales holds ")]
        held, planned = map(int, re.search(r"holds (\d+) elements.* have (\d+):", oversized).groups())
        assert held == 2 * planned
        assert oversized.endswith("elements hold no checkpoint data "
                                  "[model.layers.0.mlp.experts.w2_scales]")
