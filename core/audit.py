"""After a load: prove that the engine took exactly what the plan says, or name what it did not.

Engine-neutral. An adapter observes its engine (which quant method each layer runs, which streamed
tensors reached which parameters, which parameters were never written) and passes plain dicts
here; this module judges them against the plan. Every miss is an AuditError naming the layer and
tensor: a half-loaded model is never served.

Parameters are "armed" before loading (floats set to NaN, integers to a byte pattern), so a
parameter that no checkpoint tensor was written into, or a fused parameter with one shard missing,
is still visibly at the sentinel afterwards. The sentinel alone would trust an engine to leave
unwritten memory alone, and SGLang 0.5.23 zero-fills the tail of an oversized MoE buffer: so each
parameter's size is also checked against the planned shards this rank writes into it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch

from .errors import AuditError, MixloadError
from .formats.base import ceil_div, safetensors_dtype
from .formats.gptq import sequential_groups
from .plan import Assignment, Plan

#: kinds of module an engine runs through a quant method (norms and embeddings have none)
QUANTIZABLE = frozenset({"attention", "mlp", "experts", "router"})
_SENTINEL_BYTE = 0xA5
# Integers have no spare value: a word of packed int4 data equals the 32-bit sentinel with
# probability 2**-32. Flagging only counts 4096x above that keeps real data from tripping the
# check, while any unwritten piece (at least one group row of one shard) is far above it.
_CHANCE = 2.0**-20
_COUNT_CHUNK = 2**24   # elements per slice in `unfilled`: 16 MB of mask, 128 MB of int64


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("BF16", "I32", ...), as plans spell them."""
    return safetensors_dtype(dtype) or str(dtype).removeprefix("torch.")


def _int_sentinel(dtype: torch.dtype) -> int:
    info = torch.iinfo(dtype)
    return int.from_bytes(bytes([_SENTINEL_BYTE]) * (info.bits // 8), "little",
                          signed=info.min < 0)


def arm(params: Mapping[str, torch.Tensor]) -> None:
    """Set every parameter to the sentinel, so whatever loading does not write stays visible."""
    with torch.no_grad():
        for p in params.values():
            if p.dtype.is_floating_point:
                p.fill_(float("nan"))
            elif p.dtype != torch.bool and not p.dtype.is_complex:
                p.fill_(_int_sentinel(p.dtype))


def unfilled(params: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Parameter -> fraction of its elements still at the sentinel (only those not fully loaded)."""
    out = {}
    with torch.no_grad():
        for name, p in params.items():
            if p.numel() == 0 or p.dtype == torch.bool or p.dtype.is_complex:
                continue
            if p.dtype.is_floating_point:
                left = _count(p, torch.isnan)
                threshold = 0.0
            else:
                sentinel = _int_sentinel(p.dtype)
                left = _count(p, lambda c: c == sentinel)
                threshold = p.numel() * _CHANCE
            if left > threshold:
                out[name] = left / p.numel()
    return out


def _count(p: torch.Tensor, hit: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """How many elements `hit` marks, a slice at a time: a bool mask and sum's int64 copy of a
    whole 400M-element expert tensor took 3.6 GB of GPU memory at the end of a real-width load
    (measured: load peak 1.22x the weights for BF16), for a count."""
    flat = p.reshape(-1)
    return sum(int(hit(chunk).sum()) for chunk in flat.split(_COUNT_CHUNK))


def redundant(a: Assignment, suffix: str, tensor: torch.Tensor) -> bool:
    """Whether a planned tensor carries nothing the weights depend on, so an engine may drop it:
    a GPTQ g_idx that is just column // group (vLLM 0.30 drops every g_idx), an all-zero bias
    (engines ignore a bias the layer does not have). Anything else must be consumed."""
    if suffix == "bias":
        return not bool(tensor.any())
    if suffix == "g_idx":
        group = getattr(a.format, "group_size", None)
        return group is not None and torch.equal(
            tensor.to(torch.int32), sequential_groups(tensor.numel(), group))
    return False


@dataclass
class Observation:
    """What an adapter saw its engine do; every name is the engine's own."""

    #: engine layer (e.g. model.layers.0.self_attn.qkv_proj) -> format name its quant method runs
    #: ("unquantized", "fp8", "gptq", "awq")
    methods: dict[str, str]
    #: streamed checkpoint tensor -> engine parameters it was written into
    consumed: dict[str, set[str]] = field(default_factory=dict)
    #: streamed tensors that carry no information (see `redundant`)
    redundant: set[str] = field(default_factory=set)
    #: engine parameter -> fraction never written (see `unfilled`)
    unfilled: dict[str, float] = field(default_factory=dict)
    #: engine parameter -> dtype name after loading, before any repacking
    dtypes: dict[str, str] = field(default_factory=dict)
    #: engine parameter -> its number of elements on this rank (see `sizes`)
    sizes: dict[str, int] = field(default_factory=dict)


def sizes(params: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Parameter -> elements this rank holds, for the size check of `check`."""
    return {name: p.numel() for name, p in params.items()}


def check_methods(plan: Plan, methods: Mapping[str, str]) -> None:
    """Each planned linear group / MoE layer runs the planned format's method, and nothing else
    runs through a quant method."""
    problems = _method_problems(plan, methods)
    if problems:
        raise AuditError(problems, plan.fingerprint)


def check(plan: Plan, obs: Observation) -> None:
    """The whole audit after loading; raises AuditError listing every problem."""
    oversized = _size_problems(plan, obs)
    problems = (_method_problems(plan, obs.methods) + _tensor_problems(plan, obs)
                + list(oversized.values()) + _param_problems(plan, obs, skip=oversized.keys()))
    if problems:
        raise AuditError(problems, plan.fingerprint)


def _groups(plan: Plan) -> dict[str, list[Assignment]]:
    groups: dict[str, list[Assignment]] = defaultdict(list)
    for a in plan.assignments:
        groups[a.module.group].append(a)
    return groups


def _method_problems(plan: Plan, methods: Mapping[str, str]) -> list[MixloadError]:
    problems: list[MixloadError] = []
    groups = _groups(plan)
    for group, members in groups.items():
        if members[0].module.kind not in QUANTIZABLE:
            continue
        fmt = members[0].format
        seen = methods.get(group)
        if seen is None:
            problems.append(MixloadError(
                "the engine has no layer for this planned group", tensor=group,
                rule=members[0].origin, fix="the model class and the plan's catalog disagree; "
                                            "report it with `mixload plan --json`"))
        elif seen != fmt.name:
            problems.append(MixloadError(
                f"layer runs {seen}, but the plan says {fmt.label()} from source "
                f"{members[0].source!r}", tensor=group, rule=members[0].origin,
                fix="an adapter bug: the engine must build every layer in its planned format"))
    for layer, seen in methods.items():
        if layer not in groups:
            problems.append(MixloadError(
                f"the engine runs a {seen} layer the plan does not know", tensor=layer,
                fix="the model class and the plan's catalog disagree"))
    return problems


def _tensor_problems(plan: Plan, obs: Observation) -> list[MixloadError]:
    """Every planned tensor reached a parameter (or carries no information), bit-exact in its
    dtype unless both are floats (engines cast float weights and scales to the model dtype)."""
    problems: list[MixloadError] = []
    for a in plan.assignments:
        for suffix, t in a.tensors.items():
            targets = obs.consumed.get(t.name)
            if not targets:
                if t.name not in obs.redundant:
                    problems.append(MixloadError(
                        f"planned tensor was not written into any parameter of layer "
                        f"{a.module.group} ({a.format.label()})", file=t.file, tensor=t.name,
                        rule=a.origin, fix="the engine dropped it: an adapter bug, or a "
                                           "tensor this engine version does not load"))
                continue
            for param in sorted(targets):
                seen = obs.dtypes.get(param)
                if seen is not None and seen != t.dtype and not (
                        _is_float(seen) and _is_float(t.dtype)):
                    problems.append(MixloadError(
                        f"{t.dtype} tensor was loaded into {seen} parameter {param}",
                        file=t.file, tensor=t.name, rule=a.origin,
                        fix="the layer's quant method is not the planned format's"))
    return problems


def _is_float(name: str) -> bool:
    return name in ("F32", "BF16", "F16", "F64")


def _size_problems(plan: Plan, obs: Observation) -> dict[str, MixloadError]:
    """Parameter -> its problem, for each linear / MoE parameter larger than all the planned
    shards written into it: the rest holds whatever the engine put there (zeros, garbage), not
    checkpoint data. Only larger: a fused g_idx receives the same shard once per member, and
    embeddings (vocab padding) are left out. A layer whose plan lacks a tensor is left to the
    sentinel check, which names the missing tensor."""
    planned = {t.name: (a, s) for a in plan.assignments for s, t in a.tensors.items()}
    received: dict[str, int] = defaultdict(int)
    writers: dict[str, list[tuple[Assignment, str]]] = defaultdict(list)
    for name, targets in obs.consumed.items():
        if name not in planned:
            continue
        a, suffix = planned[name]
        shard = ceil_div(math.prod(a.tensors[suffix].shape), a.shards(suffix, plan.tp, plan.ep))
        for param in targets:
            received[param] += shard
            writers[param].append((a, suffix))
    groups = _groups(plan)
    problems = {}
    for param, have in sorted(obs.sizes.items()):
        mods = writers.get(param)
        if not mods or not all(a.module.linear and a.module.kind in QUANTIZABLE for a, _ in mods):
            continue
        if _absent(groups.get(param.rpartition(".")[0], [])):
            continue   # the plan lacks a tensor of this layer: the sentinel check names it
        if have > received[param]:
            a, suffix = mods[0]
            problems[param] = MixloadError(
                f"parameter {param} holds {have} elements on this rank, but the plan's shards "
                f"written into it (TP={plan.tp}, EP={plan.ep}) have {received[param]}: "
                f"{have - received[param]} elements hold no checkpoint data",
                file=a.tensors[suffix].file, tensor=param, rule=a.origin,
                fix="the engine's layer is not shaped for this rank's shard: an adapter bug, "
                    "or an engine version whose parameter shapes the adapter does not fix")
    return problems


def _param_problems(plan: Plan, obs: Observation, skip: Collection[str] = ()
                    ) -> list[MixloadError]:
    """Parameters still at the sentinel (`skip`: already reported as oversized)."""
    problems: list[MixloadError] = []
    groups = _groups(plan)
    for param, left in sorted(obs.unfilled.items()):
        if param in skip:
            continue
        layer = param.rpartition(".")[0]
        members = groups.get(layer, [])
        absent = _absent(members)
        why = (f"the plan has no {', '.join(absent)}" if absent else
               "no planned tensor fills it" if members else "the plan has no such layer")
        problems.append(MixloadError(
            f"parameter {param} was not filled: {left:.0%} of it was never written; {why}",
            tensor=absent[0] if absent else param,
            rule=members[0].origin if members else None,
            fix="the plan and the engine's layer disagree; run `mixload check` on the YAML"))
    return problems


def _absent(members: list[Assignment]) -> list[str]:
    """The required tensors a layer's plan rows lack ("model.layers.0.mlp.experts.5.up_proj.qzeros")."""
    return [f"{a.module.name}.{s}" for a in members for s in _required(a) if s not in a.tensors]


def _required(a: Assignment) -> list[str]:
    """The tensor suffixes the module's format needs (its optional ones excluded)."""
    if not a.module.linear:
        return ["weight"]
    return [s for s in a.format.tensor_shapes(*a.module.shape) if s not in a.format.optional]
