"""What each SGLang parameter must hold, computed from the plan's tensors by SGLang's own naming
rules (fused q/k/v and gate/up, experts stacked into w13 / w2), independently of the loader."""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

import torch
from safetensors import safe_open

from mixload.core.plan import Plan


def planned_tensors(plan: Plan) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor, for every tensor the plan names, read from its file."""
    by_file = defaultdict(list)
    for a in plan.assignments:
        for t in a.tensors.values():
            by_file[t.file].append(t.name)
    out = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in names})
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so that equality is bit-for-bit (no NaN or -0.0 leniency)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def _join(param_shape: torch.Size, shards: list[torch.Tensor]) -> torch.Tensor:
    if len(shards) == 1:
        return shards[0]
    if all(s.shape == param_shape for s in shards):   # replicated per shard (GPTQ g_idx)
        assert all(torch.equal(bits(s), bits(shards[0])) for s in shards)
        return shards[0]
    dim = next(d for d in range(len(param_shape))
               if param_shape[d] == sum(s.shape[d] for s in shards))
    return torch.cat(shards, dim)


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
EXPERT = {"w13": ("gate_proj", "up_proj"), "w2": ("down_proj",)}


def expected(name: str, param: torch.Tensor, ckpt: dict[str, torch.Tensor],
             num_experts: int) -> torch.Tensor | None:
    """The value parameter `name` must hold, or None if no checkpoint tensor backs it."""
    m = re.match(r"(.*)\.(qkv_proj|gate_up_proj)\.(\w+)$", name)
    if m:
        parts = [ckpt.get(f"{m[1]}.{p}.{m[3]}") for p in FUSED[m[2]]]
        return None if any(p is None for p in parts) else _join(param.shape, parts)
    m = re.match(r"(.*)\.experts\.(w13|w2)_(\w+)$", name)
    if m:
        per_expert = []
        for e in range(num_experts):
            parts = [ckpt.get(f"{m[1]}.experts.{e}.{p}.{m[3]}") for p in EXPERT[m[2]]]
            if any(p is None for p in parts):
                return None
            per_expert.append(_join(param.shape[1:], parts))
        return torch.stack(per_expert)
    return ckpt.get(name)


def mismatches(model: torch.nn.Module, plan: Plan) -> tuple[list[str], list[str], int]:
    """(parameters that differ from the plan, parameters no planned tensor backs, checked)."""
    ckpt = planned_tensors(plan)
    num_experts = int(plan.sources[plan.config.base].config.get("num_experts") or 0)
    return _compare(model, lambda name, p: expected(name, p, ckpt, num_experts))


def _compare(model: torch.nn.Module,
             expect: Callable[[str, torch.Tensor], torch.Tensor | None]
             ) -> tuple[list[str], list[str], int]:
    bad, unbacked, checked = [], [], 0
    for name, p in model.named_parameters():
        want = expect(name, p)
        if want is None:
            unbacked.append(name)
            continue
        checked += 1
        if _cast_loses_bits(want, p):
            bad.append(f"{name} ({want.dtype} stored as {p.dtype})")
            continue
        want = want.to(p.dtype)   # float weights/scales: what a copy into the engine dtype gives
        if want.shape != p.shape or not torch.equal(bits(p.data), bits(want)):
            bad.append(name)
    return bad, unbacked, checked


def _cast_loses_bits(want: torch.Tensor, param: torch.Tensor) -> bool:
    """Packed ints (qweight, qzeros, g_idx) must keep their dtype: a cast would change bits."""
    return want.dtype != param.dtype and not (want.dtype.is_floating_point
                                              and param.dtype.is_floating_point)


def rank_tensors(plan: Plan, ckpt: dict[str, torch.Tensor], tp_rank: int, tp: int,
                 moe_tp_rank: int, moe_tp: int) -> dict[str, torch.Tensor]:
    """The part of each planned tensor one rank holds: split along the dim the format says
    tensor parallelism splits (attention / MLP over TP, experts over the MoE TP group)."""
    out = {}
    for a in plan.assignments:
        m = a.module
        rank, size = (moe_tp_rank, moe_tp) if m.kind == "experts" else (tp_rank, tp)
        assert not m.heads or size <= m.heads, "KV-head replication is not modelled here"
        for suffix, info in a.tensors.items():
            t = ckpt[info.name]
            if size == 1:
                dim = None
            elif m.parallel == "vocab":   # embedding / lm_head rows, one contiguous block each
                dim = 0
            else:
                dim = a.format.shard_dim(suffix, m.parallel) if m.linear else None
            out[info.name] = t.chunk(size, dim)[rank] if dim is not None else t
    return out


def rank_mismatches(model: torch.nn.Module, plan: Plan, tp_rank: int, tp: int, moe_tp_rank: int,
                    moe_tp: int, experts: list[int]) -> tuple[list[str], list[str], int]:
    """`mismatches` for one rank of a TP / EP group: its shards, its local experts."""
    ckpt = rank_tensors(plan, planned_tensors(plan), tp_rank, tp, moe_tp_rank, moe_tp)
    return _compare(model, lambda name, p: _expected_local(name, p, ckpt, experts))


def _expected_local(name: str, param: torch.Tensor, ckpt: dict[str, torch.Tensor],
                    experts: list[int]) -> torch.Tensor | None:
    m = re.match(r"(.*)\.experts\.(w13|w2)_(\w+)$", name)
    if not m:
        return expected(name, param, ckpt, 0)
    per_expert = []
    for e in experts:
        parts = [ckpt.get(f"{m[1]}.experts.{e}.{p}.{m[3]}") for p in EXPERT[m[2]]]
        if any(p is None for p in parts):
            return None
        per_expert.append(_join(param.shape[1:], parts))
    return torch.stack(per_expert)
