"""What `mixload fetch` downloads for a mix of Qwen3-30B-A3B repositories given by hub id,
against downloading the three repositories whole.

    python bench/hub_savings.py [--shard-gib 4]

Writes header-only BF16, FP8-block and GPTQ-int4 checkpoints with the real shapes (sparse
files, shards of about 4 GiB as published), serves them as `Qwen/...` repositories from the
loopback hub of the tests (tests/hub_server.py) with HF_ENDPOINT pointed at it and HF_HOME in a
temporary folder, plans each mix by hub id and prints, per source, the bytes `fetch` downloads
(the planned shards + config, index and the base's tokenizer files) against the full repository,
and the bytes the planning itself transferred (counted by the server). Nothing is downloaded
(`fetch --dry-run`); tests/test_hub.py proves that a real fetch transfers exactly these shards.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# huggingface_hub reads its endpoint and cache at import: set them before anything imports it.
ROOT = Path(tempfile.mkdtemp(prefix="mixload-hub-savings-"))
os.environ.update(HF_HOME=str(ROOT / "hf"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hub_server import HubServer  # noqa: E402

SERVER = HubServer()
os.environ["HF_ENDPOINT"] = SERVER.url

import yaml  # noqa: E402

from mixload.core import config, header_only  # noqa: E402
from mixload.core.formats import Fp8, Gptq  # noqa: E402
from mixload.core.hub import fetch_rows  # noqa: E402
from mixload.core.plan import build_plan  # noqa: E402
from mixload.core.report import human  # noqa: E402

REPOS = {"bf16": ("Qwen/Qwen3-30B-A3B", None), "fp8": ("Qwen/Qwen3-30B-A3B-FP8", Fp8()),
         "int4": ("Qwen/Qwen3-30B-A3B-GPTQ-Int4", Gptq())}
EXPERTS_INT4 = {"match": "*.mlp.experts.*", "use": "int4"}
MIXES = {
    "classic: BF16 attention + INT4 experts, the rest FP8":
        [EXPERTS_INT4, {"match": "*.self_attn.*", "use": "bf16"}],
    "INT4 experts, the rest FP8": [EXPERTS_INT4],
    "BF16 first and last layer + INT4 experts, the rest FP8":
        [{"match": "re:model\\.layers\\.(0|47)\\..*", "use": "bf16"}, EXPERTS_INT4],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard-gib", type=float, default=4.0, help="shard size of the repositories")
    args = ap.parse_args()
    for name, (repo, fmt) in REPOS.items():
        folder = header_only.write(ROOT / "repos" / repo, header_only.QWEN3_30B_A3B, fmt,
                                   shard_bytes=int(args.shard_gib * 2**30))
        for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            (folder / side).write_text("{}")
        SERVER.add(repo, folder)
    print(f"# {len(MIXES)} mixes of {', '.join(r for r, _ in REPOS.values())} "
          f"(header-only, real shapes, {args.shard_gib:g} GiB shards)\n")
    with SERVER:
        for title, rules in MIXES.items():
            used = {"fp8"} | {r["use"] for r in rules}
            mix = {"sources": {n: REPOS[n][0] for n in REPOS if n in used}, "base": "fp8",
                   "rules": rules}
            path = ROOT / "mix.yaml"
            path.write_text(yaml.safe_dump(mix, sort_keys=False))
            SERVER.reset()
            t0 = time.perf_counter()
            rows = fetch_rows(build_plan(config.load(path)))
            seconds = time.perf_counter() - t0
            planning = sum(n for (_, f), n in SERVER.sent.items() if f.endswith(".safetensors"))
            print(f"## {title}\n\n| source | repository | shards needed | fetch downloads "
                  "| full repository | share |\n| --- | --- | --- | --- | --- | --- |")
            for r in rows:
                shards = [f for f in r.repo.sizes if f.endswith(".safetensors")]
                needed = [f for f in r.files if f.endswith(".safetensors")]
                print(f"| {r.source} | {r.repo.repo_id} | {len(needed)} of {len(shards)} | "
                      f"{human(r.needed_bytes)} | {human(r.repo_bytes)} | "
                      f"{r.needed_bytes / r.repo_bytes:.0%} |")
            need, full = sum(r.needed_bytes for r in rows), sum(r.repo_bytes for r in rows)
            print(f"| **all** | | | **{human(need)}** | **{human(full)}** | "
                  f"**{need / full:.0%}** |\n\nplanning by hub id: {seconds:.1f} s, "
                  f"{human(planning)} of safetensors headers transferred\n")


if __name__ == "__main__":
    main()
