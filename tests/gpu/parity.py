#!/usr/bin/env python3
"""Cross-backend parity on the GPU: every mix in configs/gpu/ through real vLLM and real SGLang
(their own kernels: CUTLASS FP8 block, Machete/Marlin int4, Marlin/Triton fused MoE), against
transformers running the same plan with every planned weight dequantized (core/reference.py).

The tiny model family and its FP8 / GPTQ / AWQ siblings are made on the machine by the project's
own code (`tiny:` sources; MIXLOAD_CACHE). Per mix and engine: greedy tokens and chosen-token
logprobs (4 prompts x 32 tokens) vs the reference and vs the other engine, the quant method (and
kernel) of every layer, the audit (a load that fails it is a failed run), and the GPU memory the
load left allocated vs the plan's bytes. Each engine runs in its own process with its own kit on
PYTHONPATH. Results accumulate in OUT/parity.json (written after every step, so a timeout keeps
what finished) and OUT/parity.md.

usage (GPU machine; kits installed by tools/gpu/install_on_device.sh):
    python3 tests/gpu/parity.py --out $OUT --site vllm=/tmp/site --site sglang=/tmp/site-sgl
    python3 tests/gpu/parity.py --report a/parity.json b/parity.json > docs/results/gpu-parity.md
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIXES = REPO / "configs" / "gpu"
PROMPTS = ["The for statement", "Exceptions are raised when", "A class definition defines",
           "The import system"]
NEW_TOKENS = 32
# bf16 rounding between two implementations of the same arithmetic moves a logprob by ~1e-2;
# FP8 activations are quantized per token group by the engines and not by the reference.
TOLERANCE = 0.05
COMMON_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "PYTHONUNBUFFERED": "1"}
ENGINE_ENV = {
    "vllm": {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_USE_DEEP_GEMM": "0",
             "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
             "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},   # llm.apply_model ships a function
    "sglang": {"SGLANG_ENABLE_JIT_DEEPGEMM": "0", "TVM_FFI_CACHE_DIR": "/tmp/tvm-ffi-cache",
               "CUDA_HOME": "/usr/local/cuda"},
}
KERNEL_ATTRS = ("kernel", "fp8_linear", "moe_kernel", "fused_experts", "moe_mk")


# ---- engine children (one process per engine and mix)

def vllm_layers(model) -> dict:   # runs inside vLLM's worker (cloudpickled by apply_model)
    import types
    from dataclasses import asdict

    methods = {}
    for name, mod in model.named_modules():
        qm = getattr(mod, "quant_method", None)
        if qm is not None and "Attention" not in type(mod).__name__:
            kernels = [type(k).__name__ for a in KERNEL_ATTRS if (k := getattr(qm, a, None))
                       is not None and not isinstance(k, (types.FunctionType, types.MethodType))]
            methods[name] = type(qm).__name__ + (f" / {kernels[0]}" if kernels else "")
    return {"methods": methods, "load": asdict(model.mixload_report)}


def child_vllm(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    import vllm

    from mixload.core.build import build

    folder = build(job["mix"], Path(job["work"]) / "vllm-model", overwrite=True)
    t0 = time.time()
    llm = LLM(str(folder), load_format="mixed", enforce_eager=True,
              compilation_config={"mode": 0}, gpu_memory_utilization=0.3, max_model_len=256,
              skip_tokenizer_init=True, dtype="bfloat16", seed=0)
    t_init = time.time() - t0
    res = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]],
                       SamplingParams(temperature=0, max_tokens=job["new_tokens"],
                                      ignore_eos=True, logprobs=1))
    outs = [{"tokens": list(o.token_ids),
             "logprobs": [float(lp[t].logprob) for t, lp in zip(o.token_ids, o.logprobs)]}
            for o in (r.outputs[0] for r in res)]
    rep = llm.apply_model(vllm_layers)[0]
    load = rep["load"]
    return {"version": vllm.__version__, "t_init": round(t_init, 1), "outputs": outs,
            "methods": rep["methods"], "gpu_held_bytes": load["gpu_held_bytes"],
            "gpu_peak_bytes": load["gpu_peak_bytes"], "bytes_read": load["read_bytes"]}


def child_sglang(job: dict) -> dict:
    import sglang

    report_dir = Path(job["work"]) / "sglang-reports"
    extra = {"mixload": {"config": job["mix"], "report_dir": str(report_dir)}}
    t0 = time.time()
    engine = sglang.Engine(model_path=job["base"], quantization="mixload",
                           model_loader_extra_config=json.dumps(extra),
                           attention_backend="triton", sampling_backend="pytorch",
                           disable_cuda_graph=True, mem_fraction_static=0.3, dtype="bfloat16",
                           random_seed=0, skip_tokenizer_init=True, log_level="info")
    t_init = time.time() - t0
    res = engine.generate(input_ids=job["prompts"], return_logprob=True, sampling_params={
        "temperature": 0, "max_new_tokens": job["new_tokens"], "ignore_eos": True})
    outs = [{"tokens": list(r["output_ids"]),
             "logprobs": [float(x[0]) for x in r["meta_info"]["output_token_logprobs"]]}
            for r in res]
    rep = json.loads(next(report_dir.glob("rank-*.json")).read_text())
    engine.shutdown()
    return {"version": sglang.__version__, "t_init": round(t_init, 1), "outputs": outs,
            "methods": rep["methods"], "gpu_held_bytes": rep["gpu_held_bytes"],
            "gpu_peak_bytes": rep["gpu_peak_bytes"], "bytes_read": rep["bytes_read"]}


def run_child(engine: str, job: dict, site: str, timeout: float) -> tuple[dict | None, str]:
    """This script as `--child ENGINE JOB` in its own process group, killed whole on timeout."""
    job_file = Path(job["work"]) / f"{engine}-job.json"
    out_file = Path(job["work"]) / f"{engine}-out.json"
    out_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps({**job, "out": str(out_file)}))
    env = {**os.environ, **COMMON_ENV, **ENGINE_ENV[engine], "PYTHONPATH": site}
    log_file = Path(job["work"]) / f"{engine}.log"
    with open(log_file, "w") as log_out:
        # A log file, not a pipe: engine helpers that outlive the child would hold a pipe open.
        p = subprocess.Popen([sys.executable, __file__, "--child", engine, str(job_file)],
                             env=env, stdout=log_out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log_out.write(f"\n[parity] TIMEOUT after {timeout} s\n")
        try:
            os.killpg(p.pid, signal.SIGKILL)   # engine helpers left behind
        except (ProcessLookupError, PermissionError):
            pass
    log = log_file.read_text(errors="replace")
    return (json.loads(out_file.read_text()) if out_file.exists() else None), log


# ---- the reference and the comparison

def reference(plan, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """transformers (bf16, GPU) on the plan's dequantized weights: greedy tokens + logprobs."""
    import torch

    from mixload.core.reference import reference_model

    model = reference_model(plan, torch.bfloat16).cuda()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            seq, lps = list(prompt), []
            for _ in range(new_tokens):
                logits = model(torch.tensor([seq], device="cuda")).logits[0, -1].float()
                tok = int(logits.argmax())
                lps.append(float(torch.log_softmax(logits, -1)[tok]))
                seq.append(tok)
            outs.append({"tokens": seq[len(prompt):], "logprobs": lps})
    return outs


def compare(a: list[dict], b: list[dict]) -> dict:
    """Per prompt: tokens equal before the first divergence; the largest chosen-token logprob
    difference on that common prefix."""
    prefix, worst = [], 0.0
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x["tokens"]), len(y["tokens"])) and x["tokens"][n] == y["tokens"][n]:
            n += 1
        prefix.append(n)
        worst = max([worst, *(abs(x["logprobs"][i] - y["logprobs"][i]) for i in range(n))])
    return {"common_prefix": prefix, "max_abs_logprob_diff": round(worst, 4)}


def digest(outputs: list[dict]) -> str:
    return hashlib.sha256(json.dumps([o["tokens"] for o in outputs]).encode()).hexdigest()[:12]


# ---- the driver

def run(args: argparse.Namespace) -> int:
    import torch
    from tokenizers import Tokenizer

    from mixload.core.config import load
    from mixload.core.plan import build_plan

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sites = dict(s.split("=", 1) for s in args.site)
    results_file = out / "parity.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    ok = True
    for mix in args.only or sorted(p.stem for p in MIXES.glob("*.yaml")):
        path = MIXES / f"{mix}.yaml"
        t0 = time.time()
        entry = results.setdefault(mix, {})
        try:
            plan = build_plan(load(path))   # builds the tiny family and siblings on first use
            base = plan.sources[plan.config.base].path
            tok = Tokenizer.from_file(str(base / "tokenizer.json"))
            prompts = [tok.encode(p).ids for p in PROMPTS]
            ref = reference(plan, prompts, NEW_TOKENS)
        except Exception as exc:   # one broken mix must not cost the others their device time
            ok = False
            entry["error"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps({mix: entry}), flush=True)
            results_file.write_text(json.dumps(results, indent=1))
            continue
        torch.cuda.empty_cache()
        entry.update({"config": str(path.relative_to(REPO)), "fingerprint": plan.fingerprint,
                      "plan_bytes": sum(a.nbytes for a in plan.assignments),
                      "warnings": plan.warnings, "prompts": PROMPTS,
                      "reference": ref, "reference_digest": digest(ref),
                      "reference_text": [tok.decode(o["tokens"]) for o in ref],
                      "t_prepare": round(time.time() - t0, 1)})
        work = Path(args.root) / mix
        work.mkdir(parents=True, exist_ok=True)
        job = {"mix": str(path), "base": str(base), "prompts": prompts,
               "new_tokens": NEW_TOKENS, "work": str(work)}
        for engine, site in sites.items():
            t1 = time.time()
            got, log = run_child(engine, job, site, args.timeout)
            (out / f"{mix}-{engine}.log").write_text(log)
            if got is None:
                ok = False
                entry[engine] = {"ok": False, "wall": round(time.time() - t1, 1),
                                 "log_tail": [l for l in log.splitlines() if l.strip()][-30:]}
            else:
                entry[engine] = {"ok": True, "wall": round(time.time() - t1, 1), **got,
                                 "vs_reference": compare(got["outputs"], ref),
                                 "reference_digest": digest(ref)}
            print(json.dumps({mix: {engine: {k: v for k, v in entry[engine].items()
                                             if k not in ("outputs", "methods")}}}), flush=True)
            results_file.write_text(json.dumps(results, indent=1))
    (out / "parity.md").write_text(report([results]))
    return 0 if ok else 1


def child(engine: str, job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    got = (child_vllm if engine == "vllm" else child_sglang)(job)
    Path(job["out"]).write_text(json.dumps(got))
    os._exit(0)   # engine threads would keep the process alive


# ---- the report

def report(runs: list[dict]) -> str:
    """Markdown tables from one or more parity.json (later runs fill in engines earlier ones lacked)."""
    merged: dict[str, dict] = {}
    for r in runs:
        for mix, entry in r.items():
            merged.setdefault(mix, {}).update(entry)
    lines = ["| mix | engine | quant methods (kernels) in the live model | tokens equal to the "
             "reference, per prompt (of 32) | max abs logprob diff | tokens equal to the other "
             "engine | GPU memory held after load vs plan bytes | peak during load vs held |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mix, e in sorted(merged.items()):
        if "error" in e and "reference" not in e:
            lines.append(f"| {mix} | - | FAILED before any engine: {e['error'][:150]} | | | | | |")
            continue
        engines = [k for k in ("vllm", "sglang") if k in e]
        for eng in engines:
            r = e[eng]
            if not r.get("ok"):
                lines.append(f"| {mix} | {eng} | FAILED: {(r.get('log_tail') or ['?'])[-1][:120]} "
                             "| | | | | |")
                continue
            same_ref = r.get("reference_digest") == e.get("reference_digest")
            other = next((e[o] for o in engines if o != eng and e[o].get("ok")), None)
            vs_other = compare(r["outputs"], other["outputs"])["common_prefix"] if other else "-"
            held, peak, plan = r.get("gpu_held_bytes"), r.get("gpu_peak_bytes"), e["plan_bytes"]
            mem = f"{held:,} / {plan:,} = {held / plan:.4f}" if held else "-"
            pk = f"{peak / held:.3f}" if held and peak else "-"
            methods = ", ".join(sorted(set(r["methods"].values())))
            lines.append(f"| {mix} | {eng} {r['version']} | {methods} | "
                         f"{r['vs_reference']['common_prefix'] if same_ref else 'reference differs'} | "
                         f"{r['vs_reference']['max_abs_logprob_diff']} | {vs_other} | {mem} | {pk} |")
    lines.append("")
    for mix, e in sorted(merged.items()):
        if "reference" not in e:
            continue
        lines.append(f"- **{mix}** (`{e['config']}`, plan {e['fingerprint']}): reference text of "
                     f"prompt 1 {e['prompts'][0]!r} -> {e['reference_text'][0]!r}")
        for w in e.get("warnings", []):
            lines.append(f"  - plan warning: {w}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "JOB"))
    ap.add_argument("--report", nargs="+", metavar="PARITY_JSON")
    ap.add_argument("--site", action="append", default=[], metavar="ENGINE=PYTHONPATH")
    ap.add_argument("--only", nargs="*", help="mix names (configs/gpu/NAME.yaml); default: all")
    ap.add_argument("--root", default="/tmp/mixload-parity")
    ap.add_argument("--out", default=".")
    ap.add_argument("--timeout", type=float, default=300)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return 0
    if a.report:
        sys.stdout.write(report([json.loads(Path(p).read_text()) for p in a.report]))
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
