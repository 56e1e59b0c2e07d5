"""Load + plan + check at real scale, on header-only sources (~150k tensors for the 235B).

    python bench/plan_scale.py [--case 235b seed-30b rules-100k] [--repeat 5] [--tp N] [--keep DIR]

Cases (each times `config.load` + `build_plan`, which is `mixload check`: every check runs):
  235b        Qwen3-235B-A22B, three sources (BF16, FP8-block, GPTQ-int4), three rules, TP=4. < 1 s
  seed-30b    Qwen3-30B-A3B, same three formats, a seed-form YAML mapping every expert projection
              by its exact tensor name, the seed documents' own style (48 x 128 x 3 = 18 432
              names), TP=2 (at TP=4 a GPTQ expert's down_proj shard is not whole groups). < 2 s
  rules-100k  the 235B sources, 100 000 rules: a glob first, then every expert by exact name
              (twice: the second pass, with `.weight`, must lose to the first), a regex last;
              TP=4. < 10 s
Writes the sources as sparse files (real headers, data as holes: no disk used), then prints the
median time over --repeat runs after one warm-up run (which warms the page cache).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from mixload.core import config, header_only
from mixload.core.formats import Fp8, Gptq
from mixload.core.plan import Plan, build_plan

MIX = {"sources": {"bf16": "bf16", "fp8": "fp8", "int4": "int4"}, "base": "fp8",
       "rules": [{"match": "*.mlp.experts.*", "use": "int4"},
                 {"match": "*.self_attn.*", "use": "bf16"},
                 {"match": "re:model\\.layers\\.(0|93)\\..*", "use": "bf16"}],
       "on_conflict": "error"}
PROJ = ("gate_proj", "up_proj", "down_proj")


def _experts(model: dict[str, Any]) -> list[str]:
    return [f"model.layers.{layer}.mlp.experts.{e}.{p}" for layer in range(model["num_hidden_layers"])
            for e in range(model["num_experts"]) for p in PROJ]


def seed_all_experts(root: Path) -> dict[str, Any]:
    """The seed form, every expert named: `model.layers.L.mlp.experts.E.P.weight: int4`."""
    return {"mixed_precision": {"fp16_path": str(root / "bf16"), "fp8_path": str(root / "fp8"),
                                "int4_path": str(root / "int4"),
                                "weight_mapping": {f"{n}.weight": "int4"
                                                   for n in _experts(header_only.QWEN3_30B_A3B)}}}


def rules_100k(n: int = 100_000) -> dict[str, Any]:
    """A generated rule list: layer 93's experts by a glob first (their exact rules below lose),
    every expert of the 235B by name, the same names again with `.weight` (all shadowed), and a
    regex last (it still picks the non-expert modules of layers 0 and 93)."""
    names = _experts(header_only.QWEN3_235B_A22B)
    rules = [{"match": "model.layers.93.mlp.experts.*", "use": "bf16"}]
    while len(rules) < n - 1:
        k = len(rules) - 1
        shadowed = k >= len(names)
        rules.append({"match": names[k % len(names)] + (".weight" if shadowed else ""),
                      "use": "fp8" if shadowed else "int4"})
    rules.append({"match": "re:model\\.layers\\.(0|93)\\..*", "use": "bf16"})
    return {"sources": MIX["sources"], "base": "fp8", "rules": rules, "on_conflict": "error"}


def _time(mix: Path, repeat: int, tp: int) -> tuple[list[float], list[float], Plan]:
    """Wall and CPU seconds of each run: on a shared machine the CPU time is what a quiet one
    would show (the wall time also counts the waits for a core)."""
    wall, cpu, plan = [], [], None
    for _ in range(repeat + 1):           # the first run warms the page cache
        t, c = time.perf_counter(), time.process_time()
        plan = build_plan(config.load(mix), tp=tp)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    assert plan is not None
    return wall[1:], cpu[1:], plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs="+", default=["235b", "seed-30b", "rules-100k"],
                    choices=["235b", "seed-30b", "rules-100k"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tp", type=int, help="override each case's TP size")
    ap.add_argument("--keep", type=Path, help="write the sources here and keep them")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="mixload-plan-scale-"))
    formats = {"bf16": None, "fp8": Fp8(), "int4": Gptq()}
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    for case in args.case:
        model = header_only.QWEN3_30B_A3B if case == "seed-30b" else header_only.QWEN3_235B_A22B
        folder = root / ("30b" if case == "seed-30b" else "235b")
        t0 = time.perf_counter()
        if not (folder / "int4").exists():
            header_only.write_family(folder, model, formats)
        write_s = time.perf_counter() - t0
        data = {"235b": lambda: MIX, "seed-30b": lambda: seed_all_experts(folder),
                "rules-100k": rules_100k}[case]()
        mix = folder / f"{case}.yaml"
        mix.write_text(yaml.safe_dump(data, sort_keys=False))
        tp = args.tp or (2 if case == "seed-30b" else 4)
        times, cpu, plan = _time(mix, args.repeat, tp)
        tensors = sum(len(s.tensors) for s in plan.sources.values())
        mem = plan.memory()
        print(f"[{case}] sources written in {write_s:.1f} s ({folder}); {len(plan.config.rules)} "
              f"rules, {mix.stat().st_size / 2**20:.1f} MiB of YAML")
        print(f"[{case}] tensors in {len(plan.sources)} sources: {tensors}  modules planned: "
              f"{len(plan.assignments)}  warnings: {len(plan.warnings)}")
        print(f"[{case}] load + plan + check (TP={tp}), median of {args.repeat}: "
              f"{statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f}); "
              f"CPU {statistics.median(cpu):.3f} s (min {min(cpu):.3f})")
        print(f"[{case}] weights {mem['total_bytes'] / 2**30:.1f} GiB vs all-BF16 "
              f"{mem['all_bf16_bytes'] / 2**30:.1f} GiB; per rank "
              f"{mem['per_rank_bytes'] / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
