"""`mixload analyze`: what each module costs in each available checkpoint, and whole mixes of them.

The seed's analyzer reads a model's index and proposes attention / MLP / expert precisions with
their memory. Here the same comes from the safetensors headers of the sources given, per
*decision unit*: a set of modules the engines run with one quant method, so a mix must take it
from one source — q/k/v (fused qkv_proj), o_proj, a dense gate/up (gate_up_proj), a dense
down_proj, and all experts of one MoE layer (one fused-MoE method per layer). Everything else
(embedding, lm_head, norms, router) is unquantized in every checkpoint and comes from the base.

Bytes come from plans built by `build_plan` (one per source: "every module from this source"),
so they are the plan's own numbers, TP shards included; a mix is exported as a rule-form YAML
that `mixload plan` accepts unchanged.
"""
from __future__ import annotations

import itertools
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from . import config as config_mod
from .catalog import Kind
from .errors import ConfigError
from .plan import Assignment, Plan, build_plan, shard_problems
from .formats import Unquantized
from .sources import open_source

UNIT_KINDS = ("attention", "mlp", "experts")
ANALYZE_FILE = Path("<mixload analyze>")   # parse() wants a file for messages; paths are absolute


class Option(NamedTuple):
    """One source's version of a unit."""

    source: str
    label: str                  # format label, e.g. gptq-int4-g128
    bits: int                   # bits per weight, to order precisions
    nbytes: int
    rank_bytes: int             # per TP rank
    problems: tuple[str, ...]   # why this unit can't take it at this TP (empty: it can)


@dataclass(frozen=True)
class Unit:
    """Modules that must come from one source (an engine-fused group)."""

    group: str                  # catalog group, e.g. model.layers.3.self_attn.qkv_proj
    kind: Kind
    layer: int
    modules: tuple[str, ...]
    params: int
    options: dict[str, Option]  # source -> option

    @property
    def match(self) -> str:
        """The rule pattern that selects exactly this unit."""
        return f"{self.group}.*" if self.kind == "experts" else self.group

    def feasible(self) -> dict[str, Option]:
        return {s: o for s, o in self.options.items() if not o.problems}


@dataclass
class Inventory:
    """The sources of one model, its decision units and the bytes of everything else."""

    specs: dict[str, str]       # source name -> what the user gave (a folder or tiny: name)
    paths: dict[str, str]       # source name -> folder
    base: str
    units: list[Unit]
    fixed: list[Assignment]     # modules no decision touches, from the base
    tp: int
    plans: dict[str, Plan]      # source -> every module from that source (TP 1)

    @property
    def fixed_bytes(self) -> int:
        return sum(a.rank_bytes(self.tp, 1) for a in self.fixed)

    def memory(self, choice: dict[str, str]) -> int:
        """Bytes per rank of a mix (unit group -> source), as `Plan.memory` counts them."""
        return self.fixed_bytes + sum(u.options[choice[u.group]].rank_bytes for u in self.units)

    def all_from(self, source: str) -> dict[str, str]:
        return {u.group: source for u in self.units}


# ---- sources -------------------------------------------------------------------------------

def _source_name(family: set[str], taken: set[str]) -> str:
    """`bf16`, `fp8`, `gptq`, `awq`, ...; a second source of one format gets `-2`."""
    base = sorted(family)[0]
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def open_sources(specs: list[str]) -> tuple[dict[str, str], dict[str, str], str]:
    """(name -> spec, name -> folder, base) for folders or `tiny:` names. The base is an
    unquantized source if there is one (it also supplies norms, embedding, lm_head)."""
    if not specs:
        raise ConfigError("no sources given", fix="mixload analyze FOLDER [FOLDER ...]")
    names: dict[str, str] = {}
    paths: dict[str, str] = {}
    bits: dict[str, int] = {}
    for spec in specs:
        path = config_mod._resolve_path(spec, Path.cwd())
        src = open_source(spec, path)
        name = _source_name(src.family(), set(names))
        names[name] = spec if spec.startswith(config_mod.TINY) else os.path.abspath(path)
        paths[name] = path
        bits[name] = max((f.weight_bits for f in src.formats),
                         default=Unquantized(dtype=src.dtype).weight_bits)
    base = max(bits, key=lambda n: (bits[n], -list(bits).index(n)))
    return names, paths, base


def mix_config(inv: Inventory, choice: dict[str, str]) -> dict[str, Any]:
    """The rule-form YAML document of a mix: one rule per (unit shape, source) that is not the
    base, layers folded into one regex (a 48-layer model gets a handful of rules, not 192)."""
    layers: dict[tuple[str, str], list[int]] = defaultdict(list)
    for u in inv.units:
        src = choice[u.group]
        if src != inv.base:
            layers[(re.sub(r"^model\.layers\.\d+\.", "", u.match), src)].append(u.layer)
    n_layers = len({u.layer for u in inv.units})
    rules = []
    for (tail, src), ls in sorted(layers.items(), key=lambda kv: (min(kv[1]), kv[0])):
        if len(ls) == n_layers:
            rules.append({"match": f"model.layers.*.{tail}", "use": src})
        else:
            alt = "|".join(str(i) for i in sorted(ls))
            rules.append({"match": f"re:model\\.layers\\.({alt})\\.{_regex(tail)}", "use": src})
    return {"sources": dict(inv.specs), "base": inv.base, "rules": rules, "on_conflict": "error"}


def _regex(glob_tail: str) -> str:
    """`mlp.experts.*` -> `mlp\\.experts\\..*` (the only wildcard unit patterns use)."""
    return re.escape(glob_tail).replace(re.escape("*"), ".*")


def plan_of(inv: Inventory, choice: dict[str, str]) -> Plan:
    """The mix planned by `build_plan` itself, at the inventory's TP (raises if it would fail)."""
    return build_plan(config_mod.parse(mix_config(inv, choice), ANALYZE_FILE), tp=inv.tp)


def write_yaml(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write atomically: a temp file next to `path`, then rename."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=False, width=1000)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# ---- inventory -----------------------------------------------------------------------------

def _single_source_plan(specs: dict[str, str], base: str, source: str) -> Plan:
    data = {"sources": {base: specs[base], source: specs[source]}, "base": base,
            "rules": [{"match": "*", "use": source}]}
    return build_plan(config_mod.parse(data, ANALYZE_FILE))


def _option(source: str, rows: list[Assignment], tp: int) -> Option:
    labels = sorted({a.format.label() for a in rows})
    problems = [] if len(labels) == 1 else [f"stored in several formats ({', '.join(labels)})"]
    problems += sorted({why for a in rows for why in shard_problems(a, tp, 1)})
    return Option(source, "/".join(labels), min(a.format.weight_bits for a in rows),
                  sum(a.nbytes for a in rows), sum(a.rank_bytes(tp, 1) for a in rows),
                  tuple(problems))


def inventory(specs: list[str], tp: int = 1) -> Inventory:
    """Every decision unit with its bytes in every source (headers only)."""
    names, paths, base = open_sources(specs)
    # The base alone at this TP: heads that TP can't split fail here, once, with the plan's message.
    build_plan(config_mod.parse({"sources": {base: names[base]}, "base": base}, ANALYZE_FILE), tp=tp)
    plans = {n: _single_source_plan(names, base, n) for n in names}
    rows_by_source = {n: p.by_name() for n, p in plans.items()}
    groups: dict[str, list[Assignment]] = defaultdict(list)
    fixed = []
    for a in plans[base].assignments:
        if a.module.linear and a.module.kind in UNIT_KINDS:
            groups[a.module.group].append(a)
        else:
            fixed.append(a)
    units = []
    for group, rows in groups.items():
        m0 = rows[0].module
        options = {n: _option(n, [rows_by_source[n][a.module.name] for a in rows], tp)
                   for n in names}
        units.append(Unit(group, m0.kind, m0.layer, tuple(a.module.name for a in rows),
                          sum(_numel(a.module.shape) for a in rows), options))
    return Inventory(names, paths, base, units, fixed, tp, plans)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- the seed's proposals --------------------------------------------------------------------

class Proposal(NamedTuple):
    name: str
    choice: dict[str, str]      # unit group -> source


def proposals(inv: Inventory) -> list[Proposal]:
    """The seed analyzer's configs: one precision per module kind (its --attention_precision,
    --mlp_precision, --expert_precision), attention at least as precise as the dense MLP and the
    MLP at least as the experts, which is the seed's "attention FP16, MLP FP8, experts INT4"
    reasoning. One source per precision (the first given); mixes the TP can't split are left out."""
    by_bits: dict[int, str] = {}
    for name in inv.specs:
        bits = {u.options[name].bits for u in inv.units}
        if len(bits) == 1:
            by_bits.setdefault(bits.pop(), name)
    levels = sorted(by_bits, reverse=True)
    kinds = [k for k in UNIT_KINDS if any(u.kind == k for u in inv.units)]
    out = []
    for combo in itertools.product(levels, repeat=len(kinds)):
        if list(combo) != sorted(combo, reverse=True):
            continue
        per_kind = {k: by_bits[b] for k, b in zip(kinds, combo)}
        choice = {u.group: per_kind[u.kind] for u in inv.units}
        if all(not u.options[choice[u.group]].problems for u in inv.units):
            out.append(Proposal(" · ".join(f"{k} {per_kind[k]}" for k in kinds), choice))
    return out
