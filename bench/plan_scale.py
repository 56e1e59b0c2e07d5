"""Plan + check at the scale of Qwen3-235B-A22B: three header-only sources (~150k tensors).

    python bench/plan_scale.py [--repeat 5] [--tp 4] [--keep DIR]

Writes BF16, FP8-block and GPTQ-int4 siblings as sparse files (real headers, data as holes: no
disk used), then times `build_plan` (which is `mixload check`: every check runs) in this process,
after one warm-up run, and prints the median time and the number of tensors read.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from mixload.core import config, header_only
from mixload.core.formats import Fp8, Gptq
from mixload.core.plan import build_plan

MIX = {"sources": {"bf16": "bf16", "fp8": "fp8", "int4": "int4"}, "base": "fp8",
       "rules": [{"match": "*.mlp.experts.*", "use": "int4"},
                 {"match": "*.self_attn.*", "use": "bf16"},
                 {"match": "re:model\\.layers\\.(0|93)\\..*", "use": "bf16"}],
       "on_conflict": "error"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--keep", type=Path, help="write the sources here and keep them")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="mixload-235b-"))
    t0 = time.perf_counter()
    header_only.write_family(root, header_only.QWEN3_235B_A22B,
                             {"bf16": None, "fp8": Fp8(), "int4": Gptq()})
    write_s = time.perf_counter() - t0
    (root / "mix.yaml").write_text(yaml.safe_dump(MIX, sort_keys=False))
    times, plan = [], None
    for _ in range(args.repeat + 1):           # the first run warms the page cache
        t = time.perf_counter()
        plan = build_plan(config.load(root / "mix.yaml"), tp=args.tp)
        times.append(time.perf_counter() - t)
    assert plan is not None
    tensors = sum(len(s.tensors) for s in plan.sources.values())
    mem = plan.memory()
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"sources written in {write_s:.1f} s ({root})")
    print(f"tensors in 3 sources: {tensors}  modules planned: {len(plan.assignments)}")
    print(f"plan + check (TP={args.tp}), median of {args.repeat}: {statistics.median(times[1:]):.3f} s "
          f"(min {min(times[1:]):.3f}, max {max(times[1:]):.3f}); target < 1 s")
    print(f"weights {mem['total_bytes'] / 2**30:.1f} GiB vs all-BF16 "
          f"{mem['all_bf16_bytes'] / 2**30:.1f} GiB; per rank {mem['per_rank_bytes'] / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
