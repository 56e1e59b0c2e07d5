#!/usr/bin/env python3
"""Mixed-precision models served by real vLLM on the GPU: the kernels the CPU tests cannot run
(CUTLASS FP8 block linear, Triton FP8 MoE, Machete/Marlin GPTQ linear, Marlin int4 MoE), through
`mixload build` + `LLM(folder, load_format="mixed")` (engine core process -> plugin -> mixed loader
-> audit -> forward).

For each mix: greedy tokens and their logprobs from vLLM, against transformers running the same
plan with every planned weight dequantized (core/reference.py); the quant method and kernel per
layer; GPU bytes held by parameters vs the plan. Same mixes, prompts and checkpoints as
sglang_mixed.py, so the two engines' results line up. Writes results.json to --out.

usage (GPU machine, vLLM kit + mixload wheel in PYTHONPATH):
    python3 tests/gpu/vllm_mixed.py --root /tmp/mixgpu --out $OUT [--only moe dense awq]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from sglang_mixed import MIXES, NEW_TOKENS, PROMPTS, compare, make_checkpoints, run_child, write_mix

ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_USE_DEEP_GEMM": "0", "VLLM_NO_USAGE_STATS": "1",
       "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
       "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}   # llm.apply_model ships a function


def layer_report(model) -> dict:   # runs inside vLLM's worker
    import torch
    methods, params = {}, 0
    for name, mod in model.named_modules():
        qm = getattr(mod, "quant_method", None)
        if qm is not None and "Attention" not in type(mod).__name__:
            kernel = getattr(qm, "kernel", None) or getattr(qm, "fp8_linear", None)
            methods[name] = type(qm).__name__ + (f" / {type(kernel).__name__}" if kernel else "")
    for p in model.parameters():
        params += p.numel() * p.element_size()
    return {"methods": methods, "param_bytes": params,
            "cuda_allocated": torch.cuda.memory_allocated()}


def child(folder: str, _base: str, out: str) -> None:
    t0 = time.time()
    from vllm import LLM, SamplingParams
    import vllm

    llm = LLM(folder, load_format="mixed", enforce_eager=True, gpu_memory_utilization=0.3,
              max_model_len=256, skip_tokenizer_init=True, dtype="bfloat16", seed=0)
    t_init = time.time() - t0
    t1 = time.time()
    res = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                       SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                      logprobs=1))
    t_gen = time.time() - t1
    got = []
    for r in res:
        o = r.outputs[0]
        got.append({"tokens": list(o.token_ids),
                    "logprobs": [float(lp[t].logprob) for t, lp in zip(o.token_ids, o.logprobs)]})
    report = llm.apply_model(layer_report)[0]
    Path(out).write_text(json.dumps({"vllm": vllm.__version__, "t_init": round(t_init, 1),
                                     "t_generate": round(t_gen, 2), "engine": got,
                                     "report": report}))
    os._exit(0)


def reference(mix: Path) -> list[dict]:
    import torch

    from mixload.core.config import load
    from mixload.core.plan import build_plan
    from mixload.core.reference import reference_model

    hf = reference_model(build_plan(load(mix)), torch.bfloat16).cuda()
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            seq, lps = list(prompt), []
            for _ in range(NEW_TOKENS):
                logits = hf(torch.tensor([seq], device="cuda")).logits[0, -1].float()
                tok = int(logits.argmax())
                lps.append(float(torch.log_softmax(logits, -1)[tok]))
                seq.append(tok)
            out.append({"tokens": seq[len(prompt):], "logprobs": lps})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--root", default="/tmp/mixgpu")
    ap.add_argument("--out", default=".")
    ap.add_argument("--only", nargs="*", default=["moe", "dense", "awq"])
    ap.add_argument("--timeout", type=float, default=240)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return 0
    from mixload.core.build import build
    from mixload.core.config import load
    from mixload.core.plan import build_plan

    root, out = Path(a.root), Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results, ok = {}, True
    for name in a.only:
        arch, base, rules = MIXES[name]
        ckpts = make_checkpoints(root, arch)
        mix = write_mix(root / f"{name}.yaml", ckpts, base, rules)
        folder = root / f"{name}-vllm"
        build(mix, folder, overwrite=True)
        t0 = time.time()
        got, log = run_child(folder, ckpts[base], out / f"vllm-{name}.json", a.timeout,
                             script=__file__, env_extra=ENV)
        (out / f"vllm-{name}.log").write_text(log)
        if got is None:
            ok = False
            tail = [l for l in log.splitlines() if l.strip()][-30:]
            results[name] = {"ok": False, "wall": round(time.time() - t0, 1), "log_tail": tail}
            print(json.dumps({name: results[name]}, indent=1), flush=True)
            continue
        plan = build_plan(load(mix))
        rep = got["report"]
        results[name] = {"ok": True, "wall": round(time.time() - t0, 1), "t_init": got["t_init"],
                         "t_generate": got["t_generate"], "vllm": got["vllm"],
                         **compare(got["engine"], reference(mix)),
                         "methods": sorted(set(rep["methods"].values())),
                         "planned_bytes": sum(x.nbytes for x in plan.assignments),
                         "param_bytes": rep["param_bytes"], "cuda_allocated": rep["cuda_allocated"]}
        print(json.dumps({name: results[name]}, indent=1), flush=True)
    (out / "vllm-results.json").write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
