#!/usr/bin/env python3
"""Mixed-precision models served by real SGLang on the GPU: the quantized kernels the CPU tests
cannot run (Marlin GPTQ linear + MoE, FP8 block linear + MoE), through the engine's own path
(Engine -> scheduler process -> load_plugins -> mixload loader -> audit -> forward).

For each mix: greedy tokens and their logprobs from SGLang, against transformers running the same
plan with every planned weight dequantized (the reference). Writes results.json to --out.

usage (GPU machine, SGLang kit + mixload wheel in PYTHONPATH):
    python3 tests/gpu/sglang_mixed.py --root /tmp/mix --out $OUT [--only moe dense] [--timeout 300]
child: python3 tests/gpu/sglang_mixed.py --child MIX.yaml BASE OUT.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [[1, 5, 9, 33, 100, 7, 300, 42], [17, 230, 11, 4, 99, 512, 3], [600, 601, 2, 8, 77]]
NEW_TOKENS = 16
ENGINE_KW = dict(attention_backend="triton", sampling_backend="pytorch", disable_cuda_graph=True,
                 mem_fraction_static=0.3, dtype="bfloat16", random_seed=0,
                 skip_tokenizer_init=True, log_level="info")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1", "SGLANG_ENABLE_JIT_DEEPGEMM": "0",
       "TVM_FFI_CACHE_DIR": "/tmp/tvm-ffi-cache", "CUDA_HOME": "/usr/local/cuda"}

TINY = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, head_dim=128,
            num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False,
            max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
            intermediate_size=512, bos_token_id=1, eos_token_id=2)
TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)

# Every SGLang method mixload delegates to ("moe" and "dense" by default; "awq" on request).
MIXES = {
    "moe": ("qwen3-moe", "bf16", [
        ("model.layers.0.self_attn.*", "fp8"),        # Fp8LinearMethod (block)
        ("model.layers.0.mlp.experts.*", "gptq"),     # GPTQMarlinMoEMethod
        ("model.layers.1.mlp.experts.*", "fp8"),      # Fp8MoEMethod
    ]),                                               # layer 1 attention: UnquantizedLinearMethod
    # AWQ-Marlin: its repack kernels are not in the prebuilt JIT cache (nvcc at first use).
    "awq": ("qwen3-moe", "bf16", [
        ("model.layers.0.self_attn.*", "awq"),        # AWQLinearMethod + AWQMarlinLinearScheme
        ("model.layers.*.mlp.experts.*", "awq"),      # AWQMoEMethod (Marlin MoE)
    ]),
    "bf16": ("qwen3-moe", "bf16", []),               # control: every module unquantized
    "dense": ("qwen3", "bf16", [
        ("model.layers.0.self_attn.*", "gptq"),       # GPTQMarlinLinearMethod
        ("model.layers.0.mlp.*", "fp8"),              # Fp8LinearMethod
        ("model.layers.1.self_attn.*", "fp8"),
    ]),
}


def make_checkpoints(root: Path, arch: str) -> dict[str, Path]:
    """Random BF16 tiny model (lm_head scaled: a random model's next-token distribution is
    nearly flat, and two implementations would part at the first near-tie) + converted siblings."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    from mixload.core.convert import convert

    out = {"bf16": root / f"{arch}-bf16"}
    if not (out["bf16"] / "config.json").exists():
        cfg = (Qwen3MoeConfig(**TINY, **TINY_MOE, architectures=["Qwen3MoeForCausalLM"])
               if arch == "qwen3-moe" else Qwen3Config(**TINY, architectures=["Qwen3ForCausalLM"]))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        sd = {k: (torch.randn(v.shape) * 0.05).to(torch.bfloat16) for k, v in model.state_dict().items()}
        sd["lm_head.weight"] = sd["lm_head.weight"] * 8
        for k in [k for k in sd if k.endswith("mlp.experts.gate_up_proj")]:
            pre = k.removesuffix("gate_up_proj")
            gu, dn = sd.pop(k), sd.pop(pre + "down_proj")
            inter = gu.shape[1] // 2
            for e in range(gu.shape[0]):
                sd[f"{pre}{e}.gate_proj.weight"] = gu[e, :inter].clone()
                sd[f"{pre}{e}.up_proj.weight"] = gu[e, inter:].clone()
                sd[f"{pre}{e}.down_proj.weight"] = dn[e].clone()
        out["bf16"].mkdir(parents=True)
        save_file(sd, str(out["bf16"] / "model.safetensors"), metadata={"format": "pt"})
        c = cfg.to_dict()
        if "num_local_experts" in c:
            c["num_experts"] = c.pop("num_local_experts")
        (out["bf16"] / "config.json").write_text(json.dumps(c, indent=2))
    for key, to in (("fp8", "fp8"), ("gptq", "gptq-int4"), ("awq", "awq-int4")):
        out[key] = root / f"{arch}-{key}"
        if not (out[key] / "config.json").exists():
            convert(out["bf16"], out[key], to)
    return out


def write_mix(path: Path, ckpts: dict[str, Path], base: str, rules: list[tuple[str, str]]) -> Path:
    import yaml
    used = {base, *(u for _, u in rules)}
    path.write_text(yaml.safe_dump({"sources": {k: str(ckpts[k]) for k in used}, "base": base,
                                    "rules": [{"match": m, "use": u} for m, u in rules]},
                                   sort_keys=False))
    return path


def reference(mix: Path) -> list[dict]:
    """transformers on the plan with every planned weight dequantized to bf16: greedy tokens
    and the logprob of each chosen token."""
    import tempfile

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from mixload.core.config import load
    from mixload.core.plan import build_plan

    plan = build_plan(load(mix))
    sd = {}
    for a in plan.assignments:
        tensors = {}
        for s, t in a.tensors.items():
            with safe_open(str(t.file), framework="pt") as f:
                tensors[s] = f.get_tensor(t.name)
        w = a.format.dequantize(tensors) if a.module.linear else tensors["weight"].float()
        sd[f"{a.module.name}.weight"] = w.to(torch.bfloat16).contiguous()
    folder = Path(tempfile.mkdtemp(prefix="mixload-ref-"))
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(plan.sources[plan.config.base].config)
    cfg.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
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


def child(mix: str, base: str, out: str) -> None:
    """One SGLang engine serving the mix (TP=1), exactly as a user would start it."""
    t0 = time.time()
    import sglang

    report_dir = str(Path(out).with_suffix("")) + "-reports"
    extra = {"mixload": {"config": mix, "report_dir": report_dir}}
    engine = sglang.Engine(model_path=base, quantization="mixload",
                           model_loader_extra_config=json.dumps(extra), **ENGINE_KW)
    t_init = time.time() - t0
    t1 = time.time()
    res = engine.generate(input_ids=PROMPTS, sampling_params={
        "temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}, return_logprob=True)
    t_gen = time.time() - t1
    got = [{"tokens": list(r["output_ids"]),
            "logprobs": [float(x[0]) for x in r["meta_info"]["output_token_logprobs"]]} for r in res]
    reports = [json.loads(p.read_text()) for p in sorted(Path(report_dir).glob("rank-*.json"))]
    Path(out).write_text(json.dumps({"sglang": sglang.__version__, "t_init": round(t_init, 1),
                                     "t_generate": round(t_gen, 2), "engine": got,
                                     "reports": reports}))
    engine.shutdown()
    os._exit(0)


def run_child(mix: Path, base: Path, out: Path, timeout: float, script: str = __file__,
              env_extra: dict[str, str] | None = None) -> tuple[dict | None, str]:
    """`script --child MIX BASE OUT` in its own process group, killed whole on timeout."""
    env = {**os.environ, **(ENV if env_extra is None else env_extra)}
    p = subprocess.Popen([sys.executable, script, "--child", str(mix), str(base), str(out)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log = (p.communicate()[0] or "") + f"\n[driver] TIMEOUT after {timeout}s"
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return (json.loads(out.read_text()) if out.exists() else None), log


def compare(engine: list[dict], ref: list[dict]) -> dict:
    agree, worst = [], 0.0
    for e, r in zip(engine, ref):
        n = 0
        while n < len(e["tokens"]) and e["tokens"][n] == r["tokens"][n]:
            n += 1
        agree.append(n)
        for i in range(n):
            worst = max(worst, abs(e["logprobs"][i] - r["logprobs"][i]))
    return {"common_prefix": agree, "of": NEW_TOKENS, "max_abs_logprob_diff_on_prefix": round(worst, 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--root", default="/tmp/mixload-gpu")
    ap.add_argument("--out", default=".")
    ap.add_argument("--only", nargs="*", default=["moe", "dense"])
    ap.add_argument("--timeout", type=float, default=300)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return 0
    root, out = Path(a.root), Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results, ok = {}, True
    for name in a.only:
        arch, base, rules = MIXES[name]
        ckpts = make_checkpoints(root, arch)
        mix = write_mix(root / f"{name}.yaml", ckpts, base, rules)
        t0 = time.time()
        got, log = run_child(mix, ckpts[base], out / f"{name}.json", a.timeout)
        (out / f"{name}.log").write_text(log)
        if got is None:
            ok = False
            tail = [l for l in log.splitlines() if l.strip()][-25:]
            results[name] = {"ok": False, "wall": round(time.time() - t0, 1), "log_tail": tail}
            print(json.dumps({name: results[name]}, indent=1), flush=True)
            continue
        ref = reference(mix)
        rep = got["reports"][0] if got["reports"] else {}
        results[name] = {"ok": True, "wall": round(time.time() - t0, 1), "t_init": got["t_init"],
                         "t_generate": got["t_generate"], "sglang": got["sglang"],
                         **compare(got["engine"], ref),
                         "methods": sorted(set(rep.get("methods", {}).values())),
                         "planned_rank_bytes": rep.get("planned_rank_bytes"),
                         "measured_rank_bytes": rep.get("measured_rank_bytes")}
        print(json.dumps({name: results[name]}, indent=1), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
