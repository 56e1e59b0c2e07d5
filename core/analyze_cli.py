"""`mixload analyze SOURCE... [--budget 20GiB] [--tp N] [--export mix.yaml] [--plot f.png]
[--calib FILE]`: the inventory and the seed's proposals (headers only), then, with a budget,
measured error scores and the least-error mix that fits, checked by `build_plan`."""
from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import analyze, budget as budget_mod, scores as scores_mod
from .config import TINY
from .errors import ConfigError
from .report import human


def add_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("analyze", help="bytes per module kind and format, the seed's proposed "
                                       "mixes; with --budget, the least-error mix that fits")
    a.add_argument("sources", nargs="+", help="checkpoint folders of one model (or tiny:NAME)")
    a.add_argument("--budget", help="weights per rank, e.g. 20GiB, 512MiB, 1.5e9")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size (budget is per rank)")
    a.add_argument("--export", help="write the chosen mix as a rule-form YAML")
    a.add_argument("--plot", help="write the error-vs-memory frontier as a PNG")
    a.add_argument("--calib", help="text file: output error on its activations (default: the "
                                   "tiny family's corpus for tiny: sources, else weight error)")


def calibration_text(args: argparse.Namespace) -> str | None:
    if args.calib:
        try:
            return Path(args.calib).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"can't read the calibration text: {exc}", file=args.calib) from None
    if any(s.startswith(TINY) for s in args.sources):
        from .tiny_family import corpus
        return corpus()[0]   # the training text: the held-out tail stays unseen
    return None


def _runs(inv: analyze.Inventory) -> list[tuple[str, list[int], list[analyze.Unit]]]:
    """(kind, layers, units of one layer) with identical consecutive layers folded."""
    per: dict[tuple[str, int], list[analyze.Unit]] = defaultdict(list)
    for u in inv.units:
        per[(u.kind, u.layer)].append(u)
    sig = lambda us: tuple((u.params, tuple(sorted((o.source, o.rank_bytes, o.problems)
                                                   for o in u.options.values()))) for u in us)
    runs: list[tuple[str, list[int], list[analyze.Unit]]] = []
    for (kind, layer), us in sorted(per.items(), key=lambda kv: (analyze.UNIT_KINDS.index(kv[0][0]),
                                                                  kv[0][1])):
        if runs and runs[-1][0] == kind and runs[-1][1][-1] == layer - 1 and sig(runs[-1][2]) == sig(us):
            runs[-1][1].append(layer)
        else:
            runs.append((kind, [layer], us))
    return runs


def inventory_table(inv: analyze.Inventory) -> Table:
    t = Table(title="Modules per kind and layer" + (f" (bytes per rank, TP={inv.tp})" if inv.tp > 1 else ""))
    t.add_column("kind")
    t.add_column("layers", justify="right")
    t.add_column("params / layer", justify="right")
    for s in inv.specs:
        t.add_column(f"{s} / layer", justify="right")
    from .plan import _ranges
    for kind, layers, us in _runs(inv):
        cells = []
        for s in inv.specs:
            opts = [u.options[s] for u in us]
            bad = any(o.problems for o in opts)
            cells.append(f"{human(sum(o.rank_bytes for o in opts))}"
                         f"{' (TP ✗)' if bad else ''}\n{'/'.join(sorted({o.label for o in opts}))}")
        t.add_row(kind, _ranges(layers), f"{sum(u.params for u in us):,}", *cells)
    t.add_section()
    t.add_row("other", "", f"{sum(analyze._numel(a.module.shape) for a in inv.fixed):,}",
              *[human(inv.fixed_bytes) if s == inv.base else "(base)" for s in inv.specs])
    t.add_row("total", "", f"{sum(u.params for u in inv.units) + sum(analyze._numel(a.module.shape) for a in inv.fixed):,}",
              *[human(inv.memory(inv.all_from(s))) for s in inv.specs])
    return t


def mix_summary(inv: analyze.Inventory, choice: dict[str, str]) -> str:
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for u in inv.units:
        by_kind[u.kind][choice[u.group]] += 1
    return "; ".join(f"{k}: " + ", ".join(f"{s} ×{n}" for s, n in c.most_common())
                     for k, c in by_kind.items())


def proposals_table(inv: analyze.Inventory, props: list[analyze.Proposal],
                    score: scores_mod.Scores | None, budget: int | None) -> Table:
    t = Table(title="The seed's proposals (one precision per module kind)")
    t.add_column("mix")
    t.add_column("weights" + (" per rank" if inv.tp > 1 else ""), justify="right")
    t.add_column("of all-BF16", justify="right")
    if score is not None:
        t.add_column("error", justify="right")
    if budget is not None:
        t.add_column("fits", justify="center")
    full = max(inv.memory(inv.all_from(s)) for s in inv.specs)
    for p in props:
        nbytes = inv.memory(p.choice)
        row = [p.name, human(nbytes), f"{100 * nbytes / full:.1f} %"]
        if score is not None:
            row.append(f"{scores_mod.total(score, p.choice):.3g}")
        if budget is not None:
            row.append("✓" if nbytes <= budget else "")
        t.add_row(*row)
    return t


def cmd_analyze(args: argparse.Namespace, out: Console) -> int:
    budget = budget_mod.parse_bytes(args.budget) if args.budget else None
    if args.tp < 1:
        raise ConfigError(f"--tp must be >= 1 (got {args.tp})")
    if (args.export or args.plot) and budget is None:
        raise ConfigError("--export and --plot need --budget", fix="add e.g. --budget 20GiB")
    inv = analyze.inventory(args.sources, tp=args.tp)
    props = analyze.proposals(inv)
    out.print(inventory_table(inv))
    score = None
    if budget is not None:
        calib = calibration_text(args)
        out.print("error scores: " + ("output error on calibration activations" if calib
                                      else "relative weight error (no calibration text)"))
        score = scores_mod.scores(inv, calib)
    out.print(proposals_table(inv, props, score, budget))
    if budget is None or score is None:
        return 0
    chosen = budget_mod.choose(inv, score, budget)
    plan = analyze.plan_of(inv, chosen.choice)   # what `mixload plan` will say, TP included
    fits = [p for p in props if inv.memory(p.choice) <= budget]
    best_seed = min(fits, key=lambda p: scores_mod.total(score, p.choice), default=None)
    out.print(f"[bold]chosen for {human(budget)}[/]: {human(chosen.nbytes)}"
              f"{' per rank' if inv.tp > 1 else ''}, error {chosen.error:.3g} "
              f"({mix_summary(inv, chosen.choice)}); planned OK, fingerprint {plan.fingerprint}")
    if best_seed is not None:
        out.print(f"best seed proposal that fits: {best_seed.name}, "
                  f"{human(inv.memory(best_seed.choice))}, error "
                  f"{scores_mod.total(score, best_seed.choice):.3g}")
    if args.export:
        path = analyze.write_yaml(args.export, analyze.mix_config(inv, chosen.choice))
        out.print(f"wrote {path} (mixload plan {path}{f' --tp {inv.tp}' if inv.tp > 1 else ''})")
    if args.plot:
        seeds = [(p, inv.memory(p.choice), scores_mod.total(score, p.choice)) for p in props]
        path = budget_mod.plot(args.plot, budget_mod.frontier(inv, score), seeds, chosen, budget)
        out.print(f"wrote {path}")
    return 0
