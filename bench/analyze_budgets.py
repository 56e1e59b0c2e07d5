"""The budget planner vs the seed's one-precision-per-kind mixes, on the tiny model family.

    python bench/analyze_budgets.py [--kind qwen3-moe] [--sources DIR...] [--plot frontier.png]

For each seed proposal (attention / MLP / experts each in one format) it measures the weights'
bytes and the held-out perplexity of the plan's transformers reference (every planned weight
dequantized). Then, with each of three seed mixes' memory as the budget, it asks the planner
(`mixload analyze --budget`, scores from the tiny corpus' training text) for its mix and measures
the same. The difference is also given per token, with its standard error over the held-out
windows (paired: same windows, same tokens), so that a small difference can be told from noise.
Prints markdown tables.
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from mixload.core import analyze, budget, reference, scores, tiny_family
from mixload.core.analyze_cli import mix_summary
from mixload.core.report import human

WINDOW = 128


def window_nll(inv: analyze.Inventory, choice: dict[str, str], ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per held-out window (reference.perplexity's windows)."""
    model = reference.reference_model(analyze.plan_of(inv, choice))
    out = []
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, WINDOW):
            chunk = ids[start:start + WINDOW + 1].unsqueeze(0)
            logits = model(chunk[:, :-1]).logits.float()
            out.append(torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), chunk[0, 1:], reduction="sum"))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="qwen3-moe", choices=sorted(tiny_family.ARCHS))
    ap.add_argument("--sources", nargs="+", help="checkpoint folders (default: the tiny family's "
                                                 "bf16, fp8, gptq-int4 and awq-int4 of --kind)")
    ap.add_argument("--plot", type=Path, help="frontier PNG for the first budget")
    args = ap.parse_args()
    torch.manual_seed(0)
    specs = args.sources or [f"tiny:{args.kind}"] + [f"tiny:{args.kind}/{f}"
                                                     for f in ("fp8", "gptq-int4", "awq-int4")]
    inv = analyze.inventory(specs)
    t0 = time.perf_counter()
    score = scores.scores(inv, tiny_family.corpus()[0])
    print(f"scores: {time.perf_counter() - t0:.1f} s (0 when cached)")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(inv.paths[inv.base])
    ids = torch.tensor(tok(tiny_family.corpus()[1], verbose=False)["input_ids"])
    n_tokens = ids.numel() - 1
    counts = torch.tensor([min(WINDOW, n_tokens - s) for s in range(0, n_tokens, WINDOW)])
    nll: dict[str, torch.Tensor] = {}

    def measure(name: str, choice: dict[str, str]) -> tuple[int, float, float]:
        nll[name] = window_nll(inv, choice, ids)
        return inv.memory(choice), scores.total(score, choice), math.exp(float(nll[name].sum()) / n_tokens)

    print(f"\n{args.kind}, held-out tokens: {n_tokens}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}\n")
    print("| seed mix | weights | error (planner's score) | held-out ppl |\n| --- | --- | --- | --- |")
    props = analyze.proposals(inv)
    seed_rows = {}
    for p in props:
        seed_rows[p.name] = measure(p.name, p.choice)
        m, e, ppl = seed_rows[p.name]
        print(f"| {p.name} | {human(m)} | {e:.4f} | {ppl:.3f} |")
    # budgets: the memory of the int4-experts mixes and of the all-fp8 one
    picks = [p for p in props if p.name in ("attention fp8 · experts gptq",
                                            "attention bf16 · experts gptq",
                                            "attention fp8 · experts fp8")]
    print("\n| budget (= seed mix) | planner's mix | weights | error | held-out ppl | that seed "
          "mix's ppl | Δ NLL / token vs it (± s.e.) | best seed mix within the budget |"
          "\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, p in enumerate(picks):
        cap = inv.memory(p.choice)
        chosen = budget.choose(inv, score, cap)
        name = f"planner@{p.name}"
        m, e, ppl = measure(name, chosen.choice)
        diff = (nll[name] - nll[p.name]) / counts   # per token, window by window
        se = float(diff.std()) / math.sqrt(len(diff))
        mix = mix_summary(inv, chosen.choice)
        best = min((r for r in seed_rows.values() if r[0] <= cap), key=lambda r: r[2])
        print(f"| {human(cap)} ({p.name}) | {mix} | {human(m)} | {e:.4f} | {ppl:.3f} | "
              f"{seed_rows[p.name][2]:.3f} | {float(diff.mean()):+.4f} ± {se:.4f} | "
              f"{best[2]:.3f} ({human(best[0])}) |")
        if args.plot and i == 0:
            seeds = [(q, inv.memory(q.choice), scores.total(score, q.choice)) for q in props]
            budget.plot(args.plot, budget.frontier(inv, score), seeds, chosen, cap)


if __name__ == "__main__":
    main()
