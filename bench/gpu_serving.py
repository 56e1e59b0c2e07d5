#!/usr/bin/env python3
"""Memory, load and decode speed of mixed models vs pure checkpoints, through real vLLM on a GPU,
at the real width of Qwen3-30B-A3B (hidden 2048, 32 q / 4 KV heads x 128, 128 experts top-8 of
width 768, vocab 151936) with fewer layers (default 12: enough for decode to be memory-bound,
and what fits the GPU machine's disk and time).

    make    random BF16 weights (made on the GPU), then the project's converter writes the FP8-block
            and GPTQ-int4 siblings, like published checkpoints
    run     one engine process per setup (5 mixes with --load-format mixed, the 3 pure checkpoints
            with vLLM's own loader), each cold (the checkpoint files are evicted from the page cache
            first), in one call so the ratios come from one machine state
    report  perf.md table + perf.png from run's JSON

P1 memory: GPU bytes the load left allocated, and its peak, by the allocator's counters around
vLLM's model-loader call (the same call for both loaders), vs the plan's bytes.
P2 decode: tokens/s at batch 1, 8, 64 = B x 128 new tokens / (time for 128 - time for 1), i.e.
prefill excluded; vs the pure checkpoint nearest in bytes per token; vs the HBM bound (bytes a
decode step reads / 3.35 TB/s, expected distinct experts per step for uniform routing).
P3 load: vLLM's own load time for both loaders, and bytes read from disk = checkpoint pages
resident in the page cache after the load (mincore) having evicted them before (fadvise).

usage (GPU machine, vLLM kit + mixload wheel in /tmp/site):
    python3 bench/gpu_serving.py make --root /tmp/bench
    python3 bench/gpu_serving.py run --root /tmp/bench --out $OUT --site /tmp/site
    python3 bench/gpu_serving.py report docs/results/gpu/perf.json --out docs/results
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from mixload.core import page_cache

HBM_BYTES_PER_S = 3.35e12   # H100 SXM
BATCHES = (1, 8, 64)
NEW_TOKENS = 128
PROMPT_TOKENS = 32
# name -> (rule-form sources, rules) over the siblings; "pure" setups use vLLM's own loader.
MIXES = {
    "bf16": ({"bf16": "bf16"}, []),
    "fp8": ({"fp8": "fp8"}, []),
    "int4": ({"gptq": "gptq-int4"}, []),
    "bf16-attn_int4-experts": ({"bf16": "bf16", "gptq": "gptq-int4"},
                               [("*.mlp.experts.*", "gptq")]),
    "fp8-attn_int4-experts": ({"fp8": "fp8", "gptq": "gptq-int4"},
                              [("*.mlp.experts.*", "gptq")]),
}
PURE = ("bf16", "fp8", "gptq-int4")
NEAREST_PURE = {"bf16": "bf16", "fp8": "fp8", "int4": "gptq-int4",
                "bf16-attn_int4-experts": "gptq-int4", "fp8-attn_int4-experts": "gptq-int4"}
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_USE_DEEP_GEMM": "0", "VLLM_NO_USAGE_STATS": "1",
       "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


# ---- make

def make(root: Path, layers: int, targets: tuple[str, ...] = PURE[1:]) -> None:
    import torch
    from safetensors.torch import save_file

    from mixload.core.convert import convert
    from mixload.core.header_only import QWEN3_30B_A3B, tensor_table

    config = {**QWEN3_30B_A3B, "num_hidden_layers": layers}
    bf16 = root / "bf16"
    if not (bf16 / "config.json").exists():
        t0 = time.time()
        bf16.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator("cuda").manual_seed(0)
        shard, size, n, weight_map = {}, 0, 0, {}

        def flush() -> None:
            nonlocal shard, size, n
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(bf16 / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

        for name, (_, shape) in tensor_table(config, None).items():
            if "norm" in name:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen, device="cuda") * 0.02).to(torch.bfloat16).cpu()
            shard[name] = t
            size += t.numel() * 2
            if size >= 4 * 2**30:
                flush()
        if shard:
            flush()
        (bf16 / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum((bf16 / f).stat().st_size for f in set(weight_map.values()))},
             "weight_map": weight_map}))
        (bf16 / "config.json").write_text(json.dumps(config, indent=2))
        print(f"make: bf16 in {time.time() - t0:.0f} s", flush=True)
    for to in targets:
        if not (root / to / "config.json").exists():
            t0 = time.time()
            try:
                convert(bf16, root / to, to, device="cuda")
            except Exception as exc:   # noqa: BLE001 - the CPU path is slow but proven
                print(f"make: {to} on the GPU failed ({exc!r}); on the CPU", flush=True)
                convert(bf16, root / to, to, overwrite=True)
            print(f"make: {to} in {time.time() - t0:.0f} s", flush=True)
    os.sync()   # dirty pages cannot be evicted: the runs must start cold


# ---- page cache: what a load read from disk

def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def evict(folders: list[Path]) -> None:
    page_cache.evict(f for d in folders for f in _files(d))


def resident_bytes(folders: list[Path]) -> int:
    return page_cache.resident_bytes(f for d in folders for f in _files(d))


# ---- run

def write_mix(root: Path, name: str) -> Path:
    import yaml

    sources, rules = MIXES[name]
    path = root / "mixes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "sources": {k: str(root / folder) for k, folder in sources.items()},
        "base": next(iter(sources)), "rules": [{"match": m, "use": u} for m, u in rules]},
        sort_keys=False))
    return path


def step_bytes(plan, batch: int) -> int:
    """Weight bytes one decode step reads: every non-expert weight but the embedding, plus the
    expected distinct experts of `batch` tokens routed uniformly top-k."""
    cfg = plan.sources[plan.config.base].config
    e, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    touched = 1 - (1 - k / e) ** batch
    total = 0
    for a in plan.assignments:
        if a.module.kind == "embedding":
            continue
        total += a.nbytes * (touched if a.module.kind == "experts" else 1)
    return int(total)


def child(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    from vllm import LLM, SamplingParams
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from mixload.core.device_memory import DeviceMemory

    # The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so vLLM's own loader
    # and mixload's are measured by the same allocator counters, around the same call.
    load_memory: dict[str, int | None] = {}
    original = BaseModelLoader.load_model

    def measured(self, *args, **kwargs):   # noqa: ANN001, ANN002, ANN003, ANN202
        with DeviceMemory() as m:
            model = original(self, *args, **kwargs)
        load_memory.update(held=m.held_bytes, peak=m.peak_bytes)
        return model

    BaseModelLoader.load_model = measured
    t0 = time.time()
    llm = LLM(job["model"], load_format=job["load_format"], skip_tokenizer_init=True,
              dtype="bfloat16", seed=0, gpu_memory_utilization=0.85, max_model_len=256,
              max_num_seqs=max(BATCHES), enable_prefix_caching=False,
              compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                  "cudagraph_capture_sizes": list(BATCHES)})
    # Read now, before decoding: later memory pressure could drop pages the load brought in.
    out = {"t_engine": round(time.time() - t0, 1), "load_memory": load_memory,
           "disk_bytes_read": resident_bytes([Path(f) for f in job["folders"]]) - job["cold"]}
    import random
    rng = random.Random(0)

    def timed(batch: int, tokens: int) -> float:
        prompts = [{"prompt_token_ids": [rng.randrange(job["vocab"]) for _ in range(PROMPT_TOKENS)]}
                   for _ in range(batch)]
        sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t

    timed(8, 16)   # warm-up
    decode = {}
    for b in BATCHES:
        full = min(timed(b, NEW_TOKENS) for _ in range(3))
        first = min(timed(b, 1) for _ in range(3))
        decode[str(b)] = round(b * (NEW_TOKENS - 1) / (full - first), 1)
    out["decode_tok_s"] = decode
    if job["load_format"] == "mixed":
        from dataclasses import asdict
        out["mixload"] = llm.apply_model(lambda m: asdict(m.mixload_report))[0]
    Path(job["out"]).write_text(json.dumps(out))
    os._exit(0)


def run_setup(name: str, job: dict, folders: list[Path], site: str, out: Path,
              timeout: float) -> dict:
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    job_file, out_file = work / f"{name}.job.json", work / f"{name}.out.json"
    out_file.unlink(missing_ok=True)
    evict(folders)
    cold = resident_bytes(folders)
    job_file.write_text(json.dumps({**job, "out": str(out_file), "cold": cold,
                                    "folders": [str(f) for f in folders]}))
    env = {**os.environ, **ENV, "PYTHONPATH": site}
    log_file = out / f"{name}.log"
    t0 = time.time()
    with open(log_file, "w") as log_out:
        # A log file, not a pipe: engine helpers that outlive the child would hold a pipe open.
        p = subprocess.Popen([sys.executable, __file__, "child", str(job_file)], env=env,
                             stdout=log_out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log_out.write(f"\n[bench] TIMEOUT after {timeout} s\n")
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    log = log_file.read_text(errors="replace")
    res = {"wall": round(time.time() - t0, 1), "resident_before": cold}
    m = re.search(r"Model loading took ([\d.]+) GiB(?: memory)? and ([\d.]+) seconds", log)
    if m:
        res["load_s"] = float(m.group(2))
    if out_file.exists():
        res.update(json.loads(out_file.read_text()), ok=True)
    else:
        res.update(ok=False, disk_bytes_read=0,
                   log_tail=[l for l in log.splitlines() if l.strip()][-25:])
    return res


def run(root: Path, out: Path, site: str, only: list[str] | None, timeout: float) -> int:
    import torch

    from mixload.core.build import build
    from mixload.core.config import load
    from mixload.core.plan import build_plan

    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "perf.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results["machine"] = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                          "torch": torch.__version__,
                          "layers": json.loads((root / "bf16" / "config.json").read_text())["num_hidden_layers"]}
    setups = only or [*(f"pure:{p}" for p in PURE), *(f"mixed:{m}" for m in MIXES)]
    for setup in setups:
        kind, name = setup.split(":")
        if kind == "pure":
            plan = build_plan(load(write_mix(root, {"bf16": "bf16", "fp8": "fp8",
                                                    "gptq-int4": "int4"}[name])))
            job = {"model": str(root / name), "load_format": "auto"}
            folders = [root / name]
        else:
            plan = build_plan(load(write_mix(root, name)))
            folder = build(write_mix(root, name), root / "built" / name, overwrite=True)
            job = {"model": str(folder), "load_format": "mixed"}
            folders = sorted({Path(s.path) for s in plan.sources.values()})
        job["vocab"] = plan.sources[plan.config.base].config["vocab_size"]
        res = run_setup(setup.replace(":", "-"), job, folders, site, out, timeout)
        res["plan_bytes"] = sum(a.nbytes for a in plan.assignments)
        res["step_bytes"] = {str(b): step_bytes(plan, b) for b in BATCHES}
        res["checkpoint_bytes"] = sum(f.stat().st_size for d in folders for f in _files(d))
        results[setup] = res
        print(json.dumps({setup: {k: v for k, v in res.items() if k != "mixload"}}), flush=True)
        results_file.write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("ok") for k, r in results.items() if k != "machine") else 1


# ---- report

def report(results: dict, out: Path) -> str:
    gib = 2**30
    rows = ["| setup | loader | weights held (GiB) vs plan | peak during load vs held | load s "
            "| disk bytes read vs kept | decode tok/s B=1 / 8 / 64 | vs nearest pure | vs HBM bound |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    points = []
    for setup, r in results.items():
        if setup == "machine" or not r.get("ok"):
            if setup != "machine":
                rows.append(f"| {setup} | FAILED: {r.get('log_tail', ['?'])[-1][:100]} | | | | | | | |")
            continue
        kind, name = setup.split(":")
        pure = results.get(f"pure:{NEAREST_PURE[name] if kind == 'mixed' else name}", {})
        dec = r["decode_tok_s"]
        mem = r.get("load_memory") or {}
        held = mem["held"] / gib if mem.get("held") else None
        plan_gib = r["plan_bytes"] / gib
        peak = f"{mem['peak'] / mem['held']:.3f}" if mem.get("held") else "-"
        vs_pure = " / ".join(f"{dec[b] / pure['decode_tok_s'][b]:.2f}" for b in dec) \
            if pure.get("ok") and kind == "mixed" else "-"
        bound = " / ".join(f"{dec[b] / (int(b) * HBM_BYTES_PER_S / r['step_bytes'][b]):.2f}"
                           for b in dec)
        rows.append(
            f"| {name} | {'mixed' if kind == 'mixed' else 'vLLM auto'} | "
            f"{f'{held:.3f}' if held is not None else '-'} vs {plan_gib:.3f} "
            f"({(held or 0) / plan_gib:.3f}) | {peak} | {r.get('load_s', '-')} | "
            f"{r['disk_bytes_read'] / gib:.2f} GiB vs {r['plan_bytes'] / gib:.2f} "
            f"({r['disk_bytes_read'] / r['plan_bytes']:.3f}) | "
            f"{' / '.join(str(dec[b]) for b in dec)} | {vs_pure} | {bound} |")
        points.append((setup, held or plan_gib, dec))
    _plot(points, out / "perf.png")
    m = results.get("machine", {})
    return (f"{m.get('gpu', '?')}, torch {m.get('torch', '?')}, "
            f"{m.get('layers', '?')} layers of Qwen3-30B-A3B width\n\n" + "\n".join(rows) + "\n")


def _plot(points: list[tuple[str, float, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BATCHES), figsize=(5 * len(BATCHES), 4), sharex=True)
    for ax, b in zip(axes, BATCHES):
        for setup, mem, dec in points:
            ax.scatter(mem, dec[str(b)], marker="o" if setup.startswith("mixed") else "s")
            ax.annotate(setup, (mem, dec[str(b)]), fontsize=7)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("GPU memory held by weights (GiB)")
        ax.set_ylabel("decode tokens/s")
    fig.suptitle("vLLM: mixed (o, --load-format mixed) vs pure checkpoints (s, vLLM's loader)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--root", type=Path, default=Path("/tmp/bench"))
    m.add_argument("--layers", type=int, default=12)
    m.add_argument("--to", nargs="*", default=list(PURE[1:]), help="siblings to convert")
    r = sub.add_parser("run")
    r.add_argument("--root", type=Path, default=Path("/tmp/bench"))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--site", default="/tmp/site")
    r.add_argument("--only", nargs="*", help="pure:bf16 mixed:int4 ...")
    r.add_argument("--timeout", type=float, default=240)
    c = sub.add_parser("child")
    c.add_argument("job")
    p = sub.add_parser("report")
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.root, a.layers, tuple(a.to))
    elif a.cmd == "run":
        return run(a.root, a.out, a.site, a.only, a.timeout)
    elif a.cmd == "child":
        child(a.job)
    else:
        sys.stdout.write(report(json.loads(a.json.read_text()), a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
