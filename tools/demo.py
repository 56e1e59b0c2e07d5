"""The main job (`nox -s demo`): a mixed-precision model planned, built and served through vLLM.

1. The embedded tiny family: a Qwen3-MoE with a dense first layer, trained here on the Python docs
   that ship with the standard library, and its FP8 / GPTQ-int4 siblings made by `mixload
   convert` (cached in ~/.cache/mixload; the first run trains, later runs reuse it).
2. The classic mix (configs/tiny-classic.yaml): BF16 attention, FP8 dense MLP, INT4 experts, or
   the nearest mix that this machine's vLLM kernels run, said plainly.
3. `mixload plan`, then `mixload build`.
4. Real vLLM: `LLM(folder, load_format="mixed")` answers a prompt; the mix's memory and its
   held-out perplexity (through vLLM) against the BF16 checkpoint served by vLLM's own loader.

    python tools/demo.py [configs/tiny-classic.yaml] [--out DIR]   # DIR: the built model folder
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

# vLLM reads these when an engine starts (see tests/vllm/conftest.py for why each).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")   # llm.apply_model(report_of)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The for statement"
WINDOW = 128          # held-out perplexity windows, as tiny_family.perplexity
MAX_WINDOWS = 64      # ~8k held-out tokens: enough to tell the mixes apart, quick on 2 cores

# What each precision of the classic mix needs from vLLM's CPU build, and the nearest stand-in.
# FP8 linears and int4 fused MoE run on AMX only; int4 linears (cpu_gemm_wna16) on AVX-512.
NEEDS = {("linear", "fp8"): "amx", ("moe", "fp8"): "amx", ("moe", "int4"): "amx",
         ("linear", "int4"): "int4_linear"}
WHY = {"amx": "vLLM's CPU FP8 and int4-MoE kernels need AMX",
       "int4_linear": "vLLM's CPU int4 linear kernel (cpu_gemm_wna16) needs AVX-512"}


def engine_dtype() -> str:
    """bfloat16 where the hardware computes in it (a GPU, a CPU with AVX-512-BF16 or AMX);
    float32 elsewhere: an AVX2-only CPU runs bf16 matmuls ~50x slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    # get_cpu_capability honours ATEN_CPU_CAPABILITY (how an AVX2 machine is emulated here).
    native = torch.backends.cpu.get_cpu_capability() != "AVX2" and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return "bfloat16" if native else "float32"


def kernels(dtype: str) -> set[str]:
    """The quantized kernel families vLLM can run on this machine in `dtype`."""
    import torch
    import vllm._custom_ops  # noqa: F401  (loads vLLM's _C ops for this CPU)

    if torch.cuda.is_available():
        return {"amx", "int4_linear"}
    if dtype == "float32":   # vLLM's CPU quantized kernels take bf16 / fp16 activations
        return set()
    have = {"amx"} if torch.cpu._is_amx_tile_supported() else set()
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        have.add("int4_linear")
    return have


def precision(source: str) -> str:
    """'fp8' / 'int4' / 'bf16' of a tiny: source spec."""
    fmt = source.partition("/")[2]
    return "fp8" if fmt.startswith("fp8") else "int4" if "int4" in fmt else "bf16"


def runnable(mix: dict[str, Any], have: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The mix with each rule's source replaced by the nearest one whose kernel runs here (FP8
    linear -> INT4 linear -> BF16; INT4 or FP8 experts -> BF16), and one line per change."""
    by_precision = {precision(s): name for name, s in mix["sources"].items()}
    rules, notes = [], []
    for rule in mix["rules"]:
        kind = "moe" if ".experts" in rule["match"] else "linear"
        use = rule["use"]
        want = precision(mix["sources"][use])
        got = want
        while NEEDS.get((kind, got), "") not in have | {""}:
            got = "int4" if (kind, got) == ("linear", "fp8") else "bf16"
        if got != want:
            rule = {**rule, "use": by_precision[got]}
            notes.append(f"{rule['match']}: {want.upper()} -> {got.upper()} "
                         f"({WHY[NEEDS[(kind, want)]]})")
        rules.append(rule)
    return {**mix, "rules": rules}, notes


def held_out_windows(tokenizer_dir: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    from mixload.core.tiny_family import corpus

    ids = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(corpus()[1]).ids
    windows = [ids[i:i + WINDOW + 1] for i in range(0, len(ids) - WINDOW - 1, WINDOW)]
    return windows[:MAX_WINDOWS]


def serve(folder: Path, windows: list[list[int]], mixed: bool, dtype: str) -> dict[str, Any]:
    """One vLLM engine on `folder`: greedy answer to PROMPT, held-out perplexity, load report."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(str(folder), load_format="mixed" if mixed else "auto", dtype=dtype,
              enforce_eager=True, max_model_len=512, seed=0)
    started = time.perf_counter() - t0
    try:
        answer = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=32),
                              use_tqdm=False)[0].outputs[0].text
        scored = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows],
                              SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        nll = count = 0
        for out, w in zip(scored, windows):
            for token, lp in zip(w[1:], out.prompt_logprobs[1:]):
                nll -= lp[token].logprob
                count += 1
        report = None
        if mixed:
            from mixload.adapters.vllm.loader import report_of
            report = llm.apply_model(report_of)[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {"answer": answer, "ppl": math.exp(nll / count), "start_s": started, "report": report}


def answer(out: Any, text: str) -> None:
    from rich.markup import escape

    out.print(f"prompt: {PROMPT!r}\nanswer: {escape(repr(text))}", highlight=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", nargs="?", default=str(ROOT / "configs" / "tiny-classic.yaml"))
    p.add_argument("--out", help="the built model folder (`mixload build -o`; default: in a "
                                 "temporary folder)")
    args = p.parse_args()

    from rich.console import Console

    from mixload.core.build import build
    from mixload.core.config import load
    from mixload.core.plan import build_plan
    from mixload.core.report import human, print_plan

    out = Console(width=120)
    t_all = time.perf_counter()
    dtype = engine_dtype()
    have = kernels(dtype)
    out.rule("mixload demo")
    out.print(f"vLLM runs in {dtype} here; its quantized kernels on this machine: "
              f"{', '.join(sorted(have)) or 'none'}")

    classic_path = Path(args.config).resolve()
    classic = yaml.safe_load(classic_path.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    out.print(f"mixload check {classic_path.name}: the tiny family is trained and converted on "
              "first use (then cached)")
    # In a child process: training leaves torch threads behind that abort this process at exit
    # once vLLM has run in it too ("terminate called without an active exception").
    rc = subprocess.run([sys.executable, "-m", "mixload.core.cli", "check",
                         str(classic_path)]).returncode
    if rc:
        sys.exit(rc)   # check printed what is wrong
    out.print(f"  ready in {time.perf_counter() - t0:.0f} s")
    classic_plan = build_plan(load(classic_path))

    work = Path(tempfile.mkdtemp(prefix="mixload-demo-"))   # only ever a new folder of ours
    mix, notes = runnable(classic, have)
    mix_path = classic_path if not notes else work / "mix.yaml"
    if notes:   # (tiny: sources are not paths, so the copy means the same elsewhere)
        mix_path.write_text(yaml.safe_dump(mix, sort_keys=False), encoding="utf-8")
        out.print("[yellow]This CPU can't run the classic mix in vLLM; serving the nearest mix "
                  "it can:[/]")
        for n in notes:
            out.print(f"  {n}")
        cm = classic_plan.memory()
        out.print(f"  (the classic mix: {human(cm['total_bytes'])} of weights, "
                  f"{cm['total_bytes'] / cm['all_bf16_bytes']:.2f}x BF16; it runs on the GPU: "
                  "docs/results/gpu-parity.md)")
    plan = build_plan(load(mix_path))
    out.rule(f"mixload plan {mix_path}")
    print_plan(plan, out)

    # build refuses a folder inside a source and replaces only one that mixload made
    folder = build(mix_path, args.out or work / "mixed", overwrite=True)
    out.print(f"mixload build -> {folder}")
    bf16 = Path(plan.sources["bf16"].path)
    windows = held_out_windows(bf16)

    out.rule("vLLM: LLM(folder, load_format=\"mixed\")")
    mixed = serve(folder, windows, mixed=True, dtype=dtype)
    r = mixed["report"]
    out.print(f"started in {mixed['start_s']:.0f} s; load audit passed: {r.read_bytes} planned "
              f"bytes read and consumed, every parameter filled")
    answer(out, mixed["answer"])
    out.rule("vLLM: the BF16 checkpoint, vLLM's own loader")
    base = serve(bf16, windows, mixed=False, dtype=dtype)
    answer(out, base["answer"])

    mem = plan.memory()
    n_tokens = sum(len(w) - 1 for w in windows)
    out.rule("mixed vs BF16")
    out.print(f"weights:              {human(mem['total_bytes'])} vs {human(mem['all_bf16_bytes'])}"
              f" ({mem['total_bytes'] / mem['all_bf16_bytes']:.2f}x)")
    out.print(f"held-out perplexity:  {mixed['ppl']:.2f} vs {base['ppl']:.2f} "
              f"({mixed['ppl'] / base['ppl']:.3f}x; {n_tokens} tokens of text not trained on)")
    out.print(f"demo took {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":   # vLLM starts worker processes that import this module
    main()
