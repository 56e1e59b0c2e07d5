"""Human-readable views of a plan (rich tables): per layer, memory, one module explained."""
from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.table import Table

from .plan import Assignment, Plan, _ranges

GiB = 2**30


def human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _cell(rows: list[Assignment]) -> str:
    kinds = sorted({f"{a.format.label()} ({a.source})" for a in rows})
    return "\n".join(kinds) if kinds else "-"


def layer_table(plan: Plan) -> Table:
    """One row per run of identical layers: which format each part of the layer uses."""
    by_layer: dict[int, dict[str, list[Assignment]]] = defaultdict(lambda: defaultdict(list))
    other: list[Assignment] = []
    for a in plan.assignments:
        if a.module.layer is None:
            other.append(a)
        else:
            by_layer[a.module.layer][a.module.kind].append(a)
    cols = ["attention", "mlp", "experts", "router", "norm"]
    cols = [c for c in cols if any(c in parts for parts in by_layer.values())]
    table = Table(title="Plan per layer", show_lines=False)
    table.add_column("layers", justify="right")
    for c in cols:
        table.add_column(c)
    table.add_column("bytes", justify="right")
    runs: list[tuple[list[int], tuple[str, ...], int]] = []
    for layer in sorted(by_layer):
        parts = by_layer[layer]
        cells = tuple(_cell(parts.get(c, [])) for c in cols)
        nbytes = sum(a.nbytes for rows in parts.values() for a in rows)
        if runs and runs[-1][1] == cells and runs[-1][0][-1] == layer - 1:
            runs[-1][0].append(layer)
            runs[-1] = (runs[-1][0], cells, runs[-1][2] + nbytes)
        else:
            runs.append(([layer], cells, nbytes))
    for layers, cells, nbytes in runs:
        table.add_row(_ranges(layers), *cells, human(nbytes))
    for a in other:
        table.add_row(a.module.name, f"{a.format.label()} ({a.source})", *[""] * (len(cols) - 1),
                      human(a.nbytes))
    return table


def memory_table(plan: Plan) -> Table:
    mem = plan.memory()
    table = Table(title=f"Memory (weights){f', TP={plan.tp}' if plan.tp > 1 else ''}"
                        f"{f', EP={plan.ep}' if plan.ep > 1 else ''}")
    table.add_column("")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    total = mem["total_bytes"] or 1
    for label, group in (("precision", mem["by_precision"]), ("kind", mem["by_kind"])):
        for key, n in sorted(group.items(), key=lambda kv: -kv[1]):
            table.add_row(f"{label}: {key}", human(n), f"{100 * n / total:.1f} %")
        table.add_section()
    table.add_row("total", human(mem["total_bytes"]),
                  f"{100 * mem['total_bytes'] / max(mem['all_bf16_bytes'], 1):.1f} % of all-BF16")
    table.add_row("all-BF16", human(mem["all_bf16_bytes"]), "")
    table.add_row(f"per rank (TP={plan.tp}, EP={plan.ep})", human(mem["per_rank_bytes"]), "")
    return table


def print_plan(plan: Plan, console: Console) -> None:
    console.print(layer_table(plan))
    console.print(memory_table(plan))
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"fingerprint {plan.fingerprint} · {len(plan.assignments)} modules · "
                  f"base {plan.config.base} · on_conflict {plan.config.on_conflict}")


def print_explain(plan: Plan, rows: list[Assignment], console: Console) -> None:
    for a in rows:
        console.print(f"[bold]{a.module.name}[/]  ({a.module.kind}, group {a.module.group})")
        console.print(f"  chosen by: {a.origin}" + (f"; {a.note}" if a.note else ""))
        src = plan.sources[a.source]
        console.print(f"  source:    {a.source}  {f'{src.hub}  ' if src.hub else ''}{src.path}")
        console.print(f"  format:    {a.format.label()}  ({human(a.nbytes)}, "
                      f"{human(a.rank_bytes(plan.tp, plan.ep))} per rank at TP={plan.tp})")
        for t in a.tensors.values():
            console.print(f"    {t.name}  {t.dtype}{list(t.shape)}  {t.file.name} "
                          f"[{t.begin}:{t.end}]", highlight=False)
