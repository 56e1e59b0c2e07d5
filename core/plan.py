"""Resolution: every logical module -> (source, format, tensors, bytes), with every check.

`build_plan` collects all problems before raising, so `mixload check` can list them at once.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import catalog
from .catalog import Module
from .config import TENSOR_SUFFIXES, MixConfig, gc_paused
from .errors import ConfigError, MixloadError, PlanError
from .formats import Unquantized, WeightFormat, shape_matches
from .formats.base import FLOAT_DTYPES
from .hub import is_hub_id, not_cached, open_hub_source
from .sources import Source, TensorInfo, open_source


@dataclass
class Assignment:
    module: Module
    source: str
    format: WeightFormat
    tensors: dict[str, TensorInfo]    # suffix -> header entry
    origin: str                       # the rule (or base) that chose the source
    note: str | None = None           # set when on_conflict moved the module

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def rank_bytes(self, tp: int, ep: int) -> int:
        """Bytes one rank holds (experts: averaged over EP ranks, which hold whole experts)."""
        if self.module.kind == "experts" and ep > 1:
            return self.nbytes // ep
        return sum(t.nbytes // self.shards(s, tp, ep) for s, t in self.tensors.items())

    def shards(self, suffix: str, tp: int, ep: int) -> int:
        """Into how many parts tensor parallelism cuts this module's tensor `suffix`; one rank
        holds one part (1: every rank holding it holds all of it)."""
        m = self.module
        if (m.kind == "experts" and ep > 1) or m.parallel == "replicated" or tp == 1:
            return 1   # under EP a rank holds whole experts
        if m.parallel == "vocab":
            return tp
        if self.format.shard_dim(suffix, m.parallel) is None:
            return 1
        return min(tp, m.heads) if m.heads else tp


@dataclass
class Plan:
    config: MixConfig
    sources: dict[str, Source]
    assignments: list[Assignment]
    tp: int = 1
    ep: int = 1
    warnings: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """A stable hash of what is loaded from where (not of paths or of TP)."""
        rows = [[a.module.name, a.source, a.format.label(), a.format.model_dump(mode="json"),
                 sorted((s, t.dtype, list(t.shape), t.file.name, t.begin, t.end)
                        for s, t in a.tensors.items())] for a in self.assignments]
        blob = json.dumps(rows, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def by_name(self) -> dict[str, Assignment]:
        return {a.module.name: a for a in self.assignments}

    def memory(self) -> dict[str, Any]:
        """Bytes by precision and by module kind, vs all-BF16, total and per TP rank."""
        by_precision: dict[str, int] = defaultdict(int)
        by_kind: dict[str, int] = defaultdict(int)
        total = rank = bf16 = 0
        for a in self.assignments:
            by_precision[a.format.precision] += a.nbytes
            by_kind[a.module.kind] += a.nbytes
            total += a.nbytes
            rank += a.rank_bytes(self.tp, self.ep)
            numel = 1
            for d in a.module.shape:
                numel *= d
            bf16 += 2 * numel + sum(t.nbytes for s, t in a.tensors.items() if s == "bias")
        return {"total_bytes": total, "all_bf16_bytes": bf16, "per_rank_bytes": rank,
                "tp": self.tp, "ep": self.ep, "by_precision": dict(by_precision),
                "by_kind": dict(by_kind)}

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "config": str(self.config.file),
            "base": self.config.base,
            "sources": {n: {"path": str(s.path), "formats": [f.label() for f in s.formats],
                            "dtype": s.dtype,
                            **({"repo": s.hub.repo_id, "revision": s.hub.revision,
                                "commit": s.hub.commit} if s.hub else {}),
                            "files": sorted({t.file.name for a in self.assignments
                                             if a.source == n for t in a.tensors.values()})}
                        for n, s in self.sources.items()},
            "memory": self.memory(),
            "warnings": self.warnings,
            "modules": [{"name": a.module.name, "kind": a.module.kind, "layer": a.module.layer,
                         "group": a.module.group, "source": a.source, "format": a.format.label(),
                         "precision": a.format.precision, "origin": a.origin, "note": a.note,
                         "bytes": a.nbytes, "rank_bytes": a.rank_bytes(self.tp, self.ep),
                         "tensors": {s: {"name": t.name, "file": t.file.name, "dtype": t.dtype,
                                         "shape": list(t.shape)} for s, t in a.tensors.items()}}
                        for a in self.assignments],
        }


def _arch_view(c: dict[str, Any]) -> dict[str, Any]:
    """The architecture keys with the engines' defaults filled in, so absent == default."""
    v = {k: c.get(k) for k in catalog.ARCH_KEYS}
    v["head_dim"] = v["head_dim"] or (c.get("hidden_size", 0) // max(c.get("num_attention_heads") or 1, 1))
    v["num_key_value_heads"] = v["num_key_value_heads"] or c.get("num_attention_heads")
    v["mlp_only_layers"] = v["mlp_only_layers"] or []
    v["decoder_sparse_step"] = v["decoder_sparse_step"] or 1
    v["tie_word_embeddings"] = bool(v["tie_word_embeddings"])
    v["num_experts"] = catalog.num_experts(c) or None
    if not v["num_experts"]:   # dense models: the MoE keys are meaningless
        for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            v[k] = None
    return v


def _open_all(cfg: MixConfig) -> tuple[dict[str, Source], list[MixloadError]]:
    sources, problems = {}, []
    for name, spec in cfg.sources.items():
        try:
            src = (open_hub_source(name, spec.path, spec.revision, cfg.file)
                   if is_hub_id(spec.path) else open_source(name, spec.path))
        except MixloadError as exc:
            problems.append(exc)
            continue
        if spec.format and spec.format not in src.family():
            problems.append(ConfigError(
                f"source {name!r} is declared {spec.format} but its checkpoint is "
                f"{'/'.join(sorted(src.family()))}", file=src.path / "config.json",
                fix=f"point {name!r} at a {spec.format} checkpoint or fix its `format:`"))
        sources[name] = src
    return sources, problems


def _check_arch(sources: dict[str, Source], base: str) -> list[MixloadError]:
    ref = _arch_view(sources[base].config)
    problems: list[MixloadError] = []
    for name, src in sources.items():
        view = _arch_view(src.config)
        for key in catalog.ARCH_KEYS:
            if view[key] != ref[key]:
                problems.append(ConfigError(
                    f"sources disagree on {key}: {base!r} has {ref[key]!r}, {name!r} has {view[key]!r}",
                    file=src.path / "config.json",
                    fix="every source must be a checkpoint of the same model"))
    return problems


def _choose(cfg: MixConfig, mods: list[Module]
            ) -> tuple[dict[str, tuple[str, str]], list[str], list[MixloadError]]:
    """module name -> (source, origin): first matching rule wins, else the base."""
    chosen: dict[str, tuple[str, str]] = {}
    rules, index = cfg.rules, cfg.index
    used = [False] * len(rules)
    problems: list[MixloadError] = []
    for m in mods:
        i = index.first(m.name)
        if i is None:
            chosen[m.name] = (cfg.base, f"base ({cfg.base})")
            continue
        used[i] = True
        chosen[m.name] = (rules[i].use, rules[i].origin)
        if rules[i].exact:   # seed mappings are a dict of names: two keys for one module must agree
            clash = next((rules[j] for j in index.naming(m.name) if j > i and rules[j].exact
                          and rules[j].use != rules[i].use), None)
            if clash:
                problems.append(ConfigError(
                    f"module {m.name} is mapped twice: {rules[i].use} and {clash.use}",
                    file=cfg.file, rule=f"{rules[i].origin}; {clash.origin}",
                    fix="keep one entry for this module"))
    # A rule that matches nothing loads nothing wrong, so it is a warning, not a failure: the
    # seed's own example maps dense `mlp.gate_proj` names that a MoE model does not have.
    names = chosen.keys()
    unused = [f"{r.origin} matches no module of the model" for r, hit in zip(rules, used)
              if not hit and (names.isdisjoint(r.names) if r.names is not None
                              else not any(r.matches(n) for n in names))]
    return chosen, unused, problems


def _format_of(src: Source, m: Module) -> WeightFormat | None:
    if m.linear:
        return src.module_format(m.name)
    w = src.tensors.get(f"{m.name}.weight")
    return Unquantized(dtype=w.dtype) if w is not None and w.dtype in FLOAT_DTYPES else None  # type: ignore[arg-type]


@lru_cache(maxsize=None)
def _expected(fmt: WeightFormat, shape: tuple[int, ...], linear: bool
              ) -> tuple[tuple[str, tuple[int, ...], frozenset[str]], ...]:
    """(suffix, shape, allowed dtypes) of each tensor a module of this shape has in `fmt`
    (cached: the 37k modules of a 235B come in a handful of format and shape pairs)."""
    shapes = {**fmt.tensor_shapes(*shape), "bias": (shape[0],)} if linear else {"weight": shape}
    dtypes = fmt.tensor_dtypes()
    return tuple((s, tuple(sh), dtypes.get(s, FLOAT_DTYPES)) for s, sh in shapes.items())


def _tensors(src: Source, m: Module, fmt: WeightFormat, mix_file: Path
             ) -> tuple[dict[str, TensorInfo], list[MixloadError]]:
    found, problems = {}, []
    for suffix, shape, allowed in _expected(fmt, m.shape, m.linear):
        name = f"{m.name}.{suffix}"
        t = src.tensors.get(name)
        if t is None:
            uncached = not_cached(src, [name], mix_file) if src.uncached else None
            if uncached or suffix not in fmt.optional:
                problems.append(uncached or MixloadError(
                    f"source {src.name!r} ({fmt.label()}) lacks a tensor this module needs",
                    file=src.path, tensor=name,
                    fix="use a source that has it, or check that the sources are the same model"))
            continue
        if t.shape != shape and not shape_matches(shape, t.shape):
            problems.append(MixloadError(
                f"shape {list(t.shape)} does not match the model: {fmt.label()} of a "
                f"{'x'.join(map(str, m.shape))} module needs {list(shape)}",
                file=t.file, tensor=name, fix="the sources must be checkpoints of one model"))
        elif t.dtype not in allowed:
            problems.append(MixloadError(
                f"dtype {t.dtype} is not valid for {fmt.label()} (expected "
                f"{'/'.join(sorted(allowed))})", file=t.file, tensor=name))
        found[suffix] = t
    return found, problems


def _short(name: str) -> str:
    """`model.layers.3.mlp.experts.17.up_proj` -> `experts.*.up_proj`, for messages."""
    tail = name.split(".mlp.", 1)[-1] if ".mlp." in name else name.rsplit(".", 1)[-1]
    return re.sub(r"experts\.\d+", "experts.*", tail)


def _resolve_groups(cfg: MixConfig, sources: dict[str, Source], mods: list[Module],
                    chosen: dict[str, tuple[str, str]], formats: dict[str, WeightFormat | None]
                    ) -> tuple[dict[str, str], list[str], list[MixloadError]]:
    """Make every fused group one format (on_conflict); returns module -> note, and fills
    `formats` with the format of every grouped module in its chosen source."""
    notes: dict[str, str] = {}
    warnings: list[str] = []
    problems: list[MixloadError] = []
    groups: dict[str, list[Module]] = defaultdict(list)
    for m in mods:
        groups[m.group].append(m)
    order = list(cfg.sources)
    splits: dict[tuple[str, str], list[int | None]] = defaultdict(list)
    origins: dict[tuple[str, str], set[str]] = {}
    for group, members in groups.items():
        if len(members) < 2:
            continue
        fmts = {m.name: _format_of(sources[chosen[m.name][0]], m) for m in members
                if chosen[m.name][0] in sources}
        formats.update(fmts)
        if None in fmts.values() or len(set(fmts.values())) < 2:
            continue   # missing tensors are reported per module
        split: dict[str, list[str]] = defaultdict(list)
        for m in members:
            split[f"{chosen[m.name][0]} ({fmts[m.name].label()})"].append(_short(m.name))
        desc = "; ".join(f"{k}: {', '.join(v[:3])}{' …' if len(v) > 3 else ''} [{len(v)}]"
                         for k, v in split.items())
        if cfg.on_conflict == "error":
            # one problem per shape of split, not per layer (a 94-layer rule gives one line)
            key = (_any_layer(group), desc)
            splits[key].append(members[0].layer)
            origins.setdefault(key, set()).update(chosen[m.name][1] for m in members)
            continue
        pick = max if cfg.on_conflict == "promote" else min
        winner = pick(members, key=lambda m: (fmts[m.name].weight_bits,
                                              -order.index(chosen[m.name][0])))
        src = chosen[winner.name][0]
        for m in members:
            if chosen[m.name][0] != src:
                notes[m.name] = f"on_conflict {cfg.on_conflict}: {chosen[m.name][0]} -> {src}"
                chosen[m.name] = (src, chosen[m.name][1])
        warnings.append(f"{group}: split ({desc}); {cfg.on_conflict}d to {src} "
                        f"({fmts[winner.name].label()})")
    for (group, desc), layers in splits.items():
        problems.append(ConfigError(
            f"fused group {group}{_in_layers(layers)} is split across formats — {desc}; the "
            "engines run one quant method per fused group", file=cfg.file,
            rule="; ".join(sorted(origins[(group, desc)])[:4]),
            fix=f"assign the whole group to one source (e.g. match '{group}*'), "
                "or set on_conflict: promote | demote"))
    return notes, warnings, problems


def _any_layer(name: str) -> str:
    return re.sub(r"layers\.\d+", "layers.*", name)


def _in_layers(layers: list[int | None]) -> str:
    known = sorted({x for x in layers if x is not None})
    if not known:
        return ""
    return f" in {len(known)} layer{'s' if len(known) > 1 else ''} ({_ranges(known)})"


def shard_problems(a: Assignment, tp: int, ep: int) -> list[str]:
    """Why this module can't be split over TP (EP) ranks in its format (empty if it can)."""
    m = a.module
    if not m.linear or m.parallel not in ("column", "row"):
        return []
    split = 1 if (m.kind == "experts" and ep > 1) else (min(tp, m.heads) if m.heads else tp)
    return a.format.tp_problems(m.shape[0], m.shape[1], m.parallel, split)


def _tp_problems(plan_rows: list[Assignment], config: dict[str, Any], tp: int, ep: int,
                 file: object) -> list[MixloadError]:
    problems: list[MixloadError] = []
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    if heads % tp:
        problems.append(MixloadError(f"{heads} attention heads are not divisible by TP={tp}",
                                     file=file, fix="choose a TP size that divides the heads"))
    if kv % tp and tp % kv:
        problems.append(MixloadError(f"{kv} KV heads and TP={tp}: neither divides the other",
                                     file=file, fix="choose a TP size that divides or is a "
                                                    "multiple of the KV heads"))
    n_exp = catalog.num_experts(config)
    if ep > 1 and n_exp % ep:
        problems.append(MixloadError(f"{n_exp} experts are not divisible by EP={ep}", file=file,
                                     fix="choose an EP size that divides the number of experts"))
    # One problem per (module kind, reason), not per layer: a 94-layer model would list 94.
    seen: dict[tuple[str, str], list[Module]] = defaultdict(list)
    for a in plan_rows:
        for why in shard_problems(a, tp, ep):
            seen[(_any_layer(a.module.group), why)].append(a.module)
    for (group, why), mods in seen.items():
        short = sorted({_short(m.name) for m in mods})
        where = (f"{group} ({', '.join(short[:3])}{' …' if len(short) > 3 else ''})"
                 + _in_layers([m.layer for m in mods]))
        problems.append(MixloadError(
            f"TP={tp}{f' EP={ep}' if ep > 1 else ''}: {why}", tensor=where,
            fix="choose another TP size, or a format whose tiles this shard fits"))
    return problems


def _ranges(xs: list[int]) -> str:
    """[0,1,2,5] -> '0-2, 5'."""
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):  # type: ignore[operator]
        if b != a + 1:
            out.append(f"{start}-{a}" if a != start else str(a))
            start = b
    return ", ".join(out)


def build_plan(cfg: MixConfig, tp: int = 1, ep: int = 1) -> Plan:
    """Resolve every module; raise PlanError listing every problem if anything is wrong."""
    with gc_paused():
        return _build_plan(cfg, tp, ep)


def _build_plan(cfg: MixConfig, tp: int, ep: int) -> Plan:
    sources, problems = _open_all(cfg)
    if cfg.base not in sources:
        raise PlanError(problems)
    base = sources[cfg.base]
    mods = catalog.modules(base.config, base.path / "config.json")
    problems += _check_arch(sources, cfg.base)
    chosen, unused, chosen_problems = _choose(cfg, mods)
    problems += chosen_problems
    formats: dict[str, WeightFormat | None] = {}
    notes, warnings, group_problems = _resolve_groups(cfg, sources, mods, chosen, formats)
    warnings = unused + warnings
    problems += group_problems
    rows: list[Assignment] = []
    for m in mods:
        name, origin = chosen[m.name]
        src = sources.get(name)
        if src is None:
            continue   # that source failed to open; already reported
        # on_conflict moved the noted modules to another source: their format is that one's
        fmt = formats.get(m.name) if m.name not in notes else None
        if fmt is None:
            fmt = _format_of(src, m)
        if fmt is None:
            problems.append(not_cached(src, [f"{m.name}.{s}" for s in TENSOR_SUFFIXES], cfg.file)
                            or MixloadError(
                f"source {name!r} has no weights for {m.kind} module {m.name}",
                file=src.path, tensor=f"{m.name}.weight", rule=origin,
                fix="point the rule at a source that has this module"))
            continue
        tensors, tensor_problems = _tensors(src, m, fmt, cfg.file)
        problems += tensor_problems
        rows.append(Assignment(m, name, fmt, tensors, origin, notes.get(m.name)))
    if tp < 1 or ep < 1:
        problems.append(ConfigError(f"TP and EP must be >= 1 (got TP={tp}, EP={ep})"))
    else:
        problems += _tp_problems(rows, base.config, tp, ep, base.path / "config.json")
    if problems:   # one uncached shard is reported once, not once per module in it
        raise PlanError(list({p.render(): p for p in problems}.values()))
    return Plan(cfg, sources, rows, tp, ep, warnings)
