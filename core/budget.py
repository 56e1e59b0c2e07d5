"""The mix that fits a memory budget with the least total error (a multiple-choice knapsack).

Each decision unit picks one source. The greedy solution: start every unit at its smallest
option, then repeatedly take the upgrade that removes the most error per byte added, walking
each unit's lower convex hull of (bytes, error). The sequence of states is the error-vs-memory
frontier; a budget takes the longest prefix that fits, then fills what is left with the best
upgrades that still fit (an upgrade the hull skipped, or one too big for the prefix). Greedy on
the hulls is optimal at each frontier point and within one unit's error of optimal between them.
"""
from __future__ import annotations

import heapq
import re
from pathlib import Path
from typing import NamedTuple

from .analyze import Inventory, Option, Proposal, Unit
from .errors import ConfigError
from .report import human
from .scores import Scores, total

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str) -> int:
    """`20GiB`, `512MiB`, `1.5e9`, `30 GB` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"can't read the budget {text!r}",
                          fix="write a positive size such as 20GiB, 512MiB, 30GB or 1.5e9 (bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class Point(NamedTuple):
    nbytes: int
    error: float
    choice: dict[str, str]


def _hull(unit: Unit, score: Scores, tp: int) -> list[Option]:
    """The unit's feasible options on the lower convex hull of (bytes, error), cheapest first."""
    opts = sorted(unit.feasible().values(),
                  key=lambda o: (o.rank_bytes, score[(unit.group, o.source)], o.source))
    if not opts:
        raise ConfigError(f"no source can hold {unit.group} at TP={tp}: "
                          + "; ".join(f"{o.source}: {', '.join(o.problems)}"
                                      for o in unit.options.values()),
                          fix="choose another --tp, or add a source in a format this shard fits")
    err = lambda o: score[(unit.group, o.source)]
    hull: list[Option] = []
    for o in opts:
        if hull and err(o) >= err(hull[-1]):
            continue   # more bytes, no less error
        while len(hull) >= 2:
            (a, b) = hull[-2], hull[-1]
            # b is above the chord a -> o: the slope a->b is no better than a->o
            if (err(b) - err(a)) * (o.rank_bytes - a.rank_bytes) >= \
                    (err(o) - err(a)) * (b.rank_bytes - a.rank_bytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def frontier(inv: Inventory, score: Scores) -> list[Point]:
    """Every state of the greedy sweep, from the smallest mix to the most precise one."""
    hulls = {u.group: _hull(u, score, inv.tp) for u in inv.units}
    at = {g: 0 for g in hulls}
    choice = {g: h[0].source for g, h in hulls.items()}
    heap: list[tuple[float, str]] = []

    def push(g: str) -> None:
        h, i = hulls[g], at[g]
        if i + 1 < len(h):
            gain = score[(g, h[i].source)] - score[(g, h[i + 1].source)]
            heapq.heappush(heap, (-gain / max(h[i + 1].rank_bytes - h[i].rank_bytes, 1), g))

    for g in hulls:
        push(g)
    points = [Point(inv.memory(choice), total(score, choice), dict(choice))]
    while heap:
        _, g = heapq.heappop(heap)
        at[g] += 1
        choice[g] = hulls[g][at[g]].source
        points.append(Point(inv.memory(choice), total(score, choice), dict(choice)))
        push(g)
    return points


def choose(inv: Inventory, score: Scores, budget: int) -> Point:
    """The least-error mix whose bytes per rank fit `budget`."""
    points = frontier(inv, score)
    if points[0].nbytes > budget:
        raise ConfigError(
            f"no mix fits {human(budget)}{f' per rank at TP={inv.tp}' if inv.tp > 1 else ''}: "
            f"the smallest possible is {human(points[0].nbytes)} ({points[0].nbytes} bytes: every "
            f"unit in its smallest format, plus {human(inv.fixed_bytes)} of embedding, lm_head, "
            "norms and router that no source quantizes)",
            fix=f"raise --budget to at least {points[0].nbytes}, add a smaller source, or use more TP")
    best = max((p for p in points if p.nbytes <= budget), key=lambda p: p.nbytes)
    return _fill(inv, score, best, budget)


def _fill(inv: Inventory, score: Scores, start: Point, budget: int) -> Point:
    """Spend what the frontier point leaves of the budget: best error drop that fits, repeatedly."""
    choice, used = dict(start.choice), start.nbytes
    units = {u.group: u for u in inv.units}
    while True:
        best: tuple[float, str, Option] | None = None
        for u in inv.units:
            cur = u.options[choice[u.group]]
            for o in u.feasible().values():
                gain = score[(u.group, cur.source)] - score[(u.group, o.source)]
                if gain > 0 and used - cur.rank_bytes + o.rank_bytes <= budget \
                        and (best is None or gain > best[0]):
                    best = (gain, u.group, o)
        if best is None:
            return Point(used, total(score, choice), choice)
        _, g, o = best
        used += o.rank_bytes - units[g].options[choice[g]].rank_bytes
        choice[g] = o.source


def plot(path: str | Path, points: list[Point], seeds: list[tuple[Proposal, int, float]],
         chosen: Point | None, budget: int | None) -> Path:
    """PNG of error vs memory: the greedy frontier, the seed's proposals, the chosen mix."""
    import os
    import tempfile

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2**30
    scale, unit = (gib, "GiB") if points[-1].nbytes >= gib else (2**20, "MiB")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.plot([p.nbytes / scale for p in points], [p.error for p in points], "-", color="tab:blue",
            lw=1.2, label="budget planner frontier")
    for i, (prop, nbytes, err) in enumerate(sorted(seeds, key=lambda s: s[1])):
        ax.scatter(nbytes / scale, err, marker="s", color="tab:orange", zorder=3,
                   label="seed proposals (one precision per kind)" if i == 0 else None)
        ax.annotate(prop.name, (nbytes / scale, err), fontsize=7,   # alternate: names overlap
                    xytext=(4, 4 if i % 2 else -10), textcoords="offset points")
    if chosen is not None:
        ax.scatter(chosen.nbytes / scale, chosen.error, marker="*", s=220, color="tab:red",
                   zorder=4, label=f"chosen: {human(chosen.nbytes)}")
    if budget is not None:
        ax.axvline(budget / scale, color="tab:red", ls="--", lw=0.8, label=f"budget {human(budget)}")
    ax.set_xlabel(f"weights per rank ({unit})")
    ax.set_ylabel("total error (sum of relative squared output errors)")
    ax.set_yscale("symlog", linthresh=max(min((p.error for p in points if p.error > 0),
                                              default=1e-6), 1e-9))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent or ".")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return out
