"""The audit's sentinel check on plain tensors: what loading left unwritten is found, in any
dtype, however large the parameter (counted a slice at a time); and its size check, which does
not trust the engine to leave unwritten memory alone."""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from mixload.core import audit, config
from mixload.core.errors import AuditError
from mixload.core.plan import build_plan

from conftest import write_yaml


def test_unwritten_elements_are_found_in_float_and_int_parameters():
    params = {"w": torch.empty(4, 8, dtype=torch.bfloat16), "qweight": torch.empty(16, dtype=torch.int32)}
    audit.arm(params)
    params["w"][:3] = 1.0          # the loader filled three rows of four
    params["qweight"].fill_(7)     # and every packed word
    assert audit.unfilled(params) == {"w": 0.25}


def test_a_parameter_larger_than_one_counting_slice_is_counted_exactly():
    n = audit._COUNT_CHUNK * 2 + 5
    p = torch.empty(n, dtype=torch.float16)
    audit.arm({"p": p})
    p[: n - 9] = 0.5               # the last 9 elements, across the slice boundary, never loaded
    assert audit.unfilled({"p": p}) == {"p": 9 / n}
    p[:] = 0.5
    assert audit.unfilled({"p": p}) == {}


def _engine(plan, oversized: str | None = None):
    """What a well-built engine's load looks like to the audit: each layer in its planned format,
    every planned tensor written into one parameter per suffix (experts stacked into w13 / w2),
    each parameter exactly the size of this rank's shards; `oversized` is built unsharded."""
    methods, consumed, sizes = {}, {}, defaultdict(int)
    for a in plan.assignments:
        methods[a.module.group] = a.format.name
        stack = ("w2_" if a.module.name.endswith("down_proj") else "w13_") if a.module.expert is not None else ""
        for suffix, t in a.tensors.items():
            param = f"{a.module.group}.{stack}{suffix}"
            consumed[t.name] = {param}
            if not (suffix == "g_idx" and a.module.parallel == "column" and param in sizes):
                full = math.prod(t.shape)
                sizes[param] += full if param == oversized else full // a.shards(suffix, plan.tp, plan.ep)
    return audit.Observation(methods=methods, consumed=consumed, sizes=dict(sizes))


def test_a_parameter_larger_than_its_planned_shards_fails_the_audit_even_if_the_engine_zeroed_it(
        small_moe, tmp_path):
    """SGLang 0.5.23 zero-fills the tail of its own (unsharded) GPTQ-MoE w2_scales at TP=2: the
    sentinel sees every element written, the size check still names the parameter."""
    mix = write_yaml(tmp_path / "mix.yaml", {
        "sources": {k: str(v) for k, v in small_moe.items()}, "base": "bf16",
        "rules": [{"match": "*.mlp.experts.*", "use": "gptq"}]})
    plan = build_plan(config.load(mix), tp=2)
    audit.check(plan, _engine(plan))
    with pytest.raises(AuditError) as err:
        audit.check(plan, _engine(plan, oversized="model.layers.0.mlp.experts.w2_scales"))
    [problem] = err.value.problems
    assert problem.tensor == "model.layers.0.mlp.experts.w2_scales"
    assert "elements hold no checkpoint data" in problem.what and "TP=2" in problem.what
