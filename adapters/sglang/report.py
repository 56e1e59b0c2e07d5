"""What one rank loaded, as a dict (JSON for the /mixload endpoint) and as one log block."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from mixload.core.plan import Plan
from mixload.core.report import human


def planned_rank_bytes(plan: Plan) -> dict[str, int]:
    """Bytes one rank should hold, by precision (the plan's own per-rank rule)."""
    out: dict[str, int] = defaultdict(int)
    for a in plan.assignments:
        out[a.format.precision] += a.rank_bytes(plan.tp, plan.ep)
    return dict(out)


def load_report(plan: Plan, measured: dict[str, int], record: Any,
                rank: dict[str, int]) -> dict[str, Any]:
    formats: dict[str, int] = defaultdict(int)
    for a in plan.assignments:
        formats[f"{a.source}:{a.format.label()}"] += 1
    return {
        "fingerprint": plan.fingerprint,
        "config": str(plan.config.file),
        "base": plan.config.base,
        "sources": {n: str(s.path) for n, s in plan.sources.items()},
        "tp": plan.tp, "ep": plan.ep, "rank": rank,
        "modules": len(plan.assignments),
        "modules_by_source_format": dict(formats),
        "planned_rank_bytes": planned_rank_bytes(plan),
        "measured_rank_bytes": measured,
        "tensors_read": record.stats.tensors,
        "files_opened": record.stats.files_opened,
        "tensors_skipped_other_ranks": len(record.skipped),
        "bytes_read": record.bytes_read,
        "load_seconds": round(record.seconds, 3),
        "gpu_held_bytes": record.gpu_held_bytes,
        "gpu_peak_bytes": record.gpu_peak_bytes,
        "warnings": plan.warnings,
    }


def log_block(report: dict[str, Any]) -> str:
    """A few lines for the server log: which plan, and memory planned vs measured."""
    planned, measured = report["planned_rank_bytes"], report["measured_rank_bytes"]
    lines = [f"mixload plan {report['fingerprint']} ({report['config']}), base {report['base']}, "
             f"TP={report['tp']} EP={report['ep']} rank {report['rank']}: "
             f"{report['modules']} modules, {report['tensors_read']} tensors "
             f"({human(report['bytes_read'])}) read in {report['load_seconds']} s, audit passed"]
    for src_fmt, n in sorted(report["modules_by_source_format"].items()):
        lines.append(f"  {src_fmt:<32} {n:>6} modules")
    lines.append(f"  {'precision':<12} {'planned/rank':>14} {'measured':>14}")
    for p in sorted(set(planned) | set(measured)):
        lines.append(f"  {p:<12} {human(planned.get(p, 0)):>14} {human(measured.get(p, 0)):>14}")
    lines.append(f"  {'total':<12} {human(sum(planned.values())):>14} "
                 f"{human(sum(measured.values())):>14}")
    return "\n".join(lines)
