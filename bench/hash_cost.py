"""What `mixload build --lock` costs a load: the stream with and without hashing, side by side.

    python bench/hash_cost.py [--repeat 5] [--mib 256]

Writes a random BF16 checkpoint of a dense Qwen3-style model (~MIB MiB, real safetensors, to
/tmp), plans all of it, and times core.stream.stream over every planned tensor, alternating
plain and hashed runs, in three settings:
- cold: the file dropped from the page cache before each run (a first load from disk);
- warm: the file in the page cache (the worst case for the ratio: reading is a memcpy);
- warm + copy: each tensor also copied into a preallocated parameter, the least an engine does.
Prints the fastest and the median run of each and their ratios hashed / plain (on a shared
machine the fastest run is the least disturbed), then one core's throughput of the hash
candidates on the same machine (why core/lock.py uses XXH3-128).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash
from safetensors.torch import save_file

from mixload.core import catalog, lock, page_cache
from mixload.core.config import parse
from mixload.core.plan import Plan, build_plan
from mixload.core.stream import content_hashes, stream


def model_config(mib: int) -> dict:
    # hidden 1024, MLP 4096: ~30 MiB of BF16 per layer; embeddings + lm_head ~32 MiB.
    layers = max(1, (mib - 32) // 30)
    return {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
            "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 128, "intermediate_size": 4096, "vocab_size": 8192,
            "torch_dtype": "bfloat16"}


def write_checkpoint(folder: Path, config: dict) -> Path:
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {f"{m.name}.weight": torch.randn(m.shape, generator=g).to(torch.bfloat16)
               for m in catalog.modules(config)}
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    fd = os.open(folder / "model.safetensors", os.O_RDONLY)
    os.fsync(fd)   # dirty pages can't be dropped from the cache
    os.close(fd)
    return folder / "model.safetensors"


def timed(run: Callable[[], None], before: Callable[[], None]) -> float:
    before()
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mixload-hash-cost-"))
    try:
        shard = write_checkpoint(root / "ckpt", model_config(args.mib))
        plan = build_plan(parse({"sources": {"bf16": str(root / "ckpt")}}, root / "mix.yaml"))
        report(plan, shard, args.repeat)
    finally:
        shutil.rmtree(root)


def report(plan: Plan, shard: Path, repeat: int) -> None:
    planned = sum(a.nbytes for a in plan.assignments)
    page_cache.evict([shard])
    print(f"after eviction {page_cache.resident_bytes([shard]) / 2**20:.0f} MiB of the shard "
          "are in the page cache")
    t = time.perf_counter()
    hashes = content_hashes(plan)
    lock_s = time.perf_counter() - t
    params = {t.name: torch.empty(t.shape, dtype=torch.bfloat16)
              for a in plan.assignments for t in a.tensors.values()}

    def drain(h: dict[str, str] | None) -> Callable[[], None]:
        def run() -> None:
            for _ in stream(plan, hashes=h):
                pass
        return run

    def copy(h: dict[str, str] | None) -> Callable[[], None]:
        def run() -> None:
            for name, tensor in stream(plan, hashes=h):
                params[name].copy_(tensor)
        return run

    cold, warm = (lambda: page_cache.evict([shard])), (lambda: None)
    settings = {"cold": (drain, cold), "warm": (drain, warm), "warm + copy": (copy, warm)}
    print(f"machine: {platform.machine()}, python {platform.python_version()}, torch "
          f"{torch.__version__}, xxhash {xxhash.VERSION}")
    print(f"planned: {len(params)} tensors, {planned / 2**20:.0f} MiB in {shard}")
    print(f"`mixload build --lock` hashing pass (cold): {lock_s:.3f} s")
    print(f"{repeat} runs each; seconds as fastest / median")
    print(f"{'setting':12s} {'plain':>13s} {'hashed':>13s} {'ratio':>13s}")
    for label, (make, before) in settings.items():
        plain, hashed = [], []
        warm()
        make(None)()   # warm-up: page cache (warm settings) and allocator
        for _ in range(repeat):   # alternate, so drift on a shared machine hits both alike
            plain.append(timed(make(None), before))
            hashed.append(timed(make(hashes), before))
        (p, h), (pm, hm) = (min(plain), min(hashed)), map(statistics.median, (plain, hashed))
        print(f"{label:12s} {p:6.3f} /{pm:6.3f} {h:6.3f} /{hm:6.3f} {h / p:6.3f} /{hm / pm:6.3f}"
              f"   (fastest: {planned / p / 1e9:.2f} vs {planned / h / 1e9:.2f} GB/s)")
    buf = bytearray(os.urandom(64 << 20))
    candidates = {"xxh3-128 (lock.digest)": lock.digest, "crc32": zlib.crc32,
                  "sha256": lambda b: hashlib.sha256(b).digest(),
                  "blake2b-128": lambda b: hashlib.blake2b(b, digest_size=16).digest()}
    for name, fn in candidates.items():
        best = min(timed(lambda: fn(buf), warm) for _ in range(3))
        print(f"hash {name:24s} {len(buf) / best / 1e9:6.2f} GB/s on one core")


if __name__ == "__main__":
    main()
