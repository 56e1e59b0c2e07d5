"""core/stream.py without an engine: what is read from disk, and what an engine took."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mixload.core import catalog, page_cache
from mixload.core.config import parse
from mixload.core.plan import Plan, build_plan
from mixload.core.stream import (Consumption, ReadStats, local_plan, planned_bytes,
                                  planned_tensors, stream)

# Two layers of ~29 MiB each: the kernel's readahead (up to 8 MiB here) stays small next to them.
CONFIG = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024, "num_hidden_layers": 2,
          "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
          "intermediate_size": 4096, "vocab_size": 2048, "torch_dtype": "bfloat16"}


def checkpoint(folder: Path, config: dict, seed: int) -> Path:
    """A random BF16 checkpoint with every tensor the catalog expects, flushed to disk."""
    import json

    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{m.name}.weight": torch.randn(m.shape, generator=g).to(torch.bfloat16)
               for m in catalog.modules(config)}
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    fd = os.open(folder / "model.safetensors", os.O_RDONLY)
    os.fsync(fd)   # dirty pages can't be evicted below
    os.close(fd)
    return folder


def two_source_plan(tmp_path: Path, config: dict) -> Plan:
    a, b = checkpoint(tmp_path / "a", config, 0), checkpoint(tmp_path / "b", config, 1)
    return build_plan(parse({"sources": {"a": str(a), "b": str(b)},
                             "rules": [{"match": "model.layers.1.*", "use": "b"}]},
                            tmp_path / "mix.yaml"))


def disk_read_bytes() -> int:
    return int(dict(line.split(": ") for line in
                    Path("/proc/self/io").read_text().splitlines())["read_bytes"])


def readahead(path: Path) -> int | None:
    """The kernel's readahead window for the disk holding `path`, in bytes."""
    dev = os.stat(path).st_dev
    block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for queue in (block / "queue", block / ".." / "queue"):   # a partition's is its disk's
        if (queue / "read_ahead_kb").exists():
            return int((queue / "read_ahead_kb").read_text()) * 1024
    return None


def runs(plan: Plan) -> int:
    """How many contiguous byte ranges the planned tensors make, over all files."""
    n = 0
    for infos in planned_tensors(plan).values():
        n += 1 + sum(b.begin != a.end for a, b in zip(infos, infos[1:]))
    return n


def test_reads_from_disk_the_planned_bytes_and_readahead(tmp_path: Path) -> None:
    plan = two_source_plan(tmp_path, CONFIG)
    files = list(planned_tensors(plan))
    window = readahead(files[0])
    if window is None:
        pytest.skip("no block device under the temp folder (tmpfs?): reads aren't counted")
    for f in files:   # drop the files from the page cache: reading them goes to the disk
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    stats = ReadStats()
    before = disk_read_bytes()
    for _ in stream(plan, stats):
        pass
    disk = disk_read_bytes() - before
    planned = planned_bytes(plan)
    assert stats.bytes_read == planned and stats.files_opened == 2
    # Every planned page, plus at most the readahead window on either side of each run.
    assert planned <= disk <= planned + 2 * window * runs(plan)
    assert disk < sum(f.stat().st_size for f in files)   # the unplanned half stayed on disk


def test_a_source_used_for_one_tensor_is_read_without_readahead(tmp_path: Path) -> None:
    """Taking one 512 KiB tensor from a 58 MiB BF16 shard (say, attention from the BF16
    checkpoint, experts from an int4 one) reads that tensor's pages, not a readahead window
    around it."""
    a, b = checkpoint(tmp_path / "a", CONFIG, 0), checkpoint(tmp_path / "b", CONFIG, 1)
    plan = build_plan(parse({"sources": {"a": str(a), "b": str(b)}, "rules": [
        {"match": "model.layers.1.self_attn.k_proj", "use": "b"}]}, tmp_path / "mix.yaml"))
    shard = b / "model.safetensors"
    if readahead(shard) is None:
        pytest.skip("no block device under the temp folder (tmpfs?): the page cache is the disk")
    page_cache.evict([shard])
    assert page_cache.resident_bytes([shard]) == 0
    for _ in stream(plan):
        pass
    (k_proj,) = planned_tensors(plan)[shard]
    assert k_proj.nbytes <= page_cache.resident_bytes([shard]) <= k_proj.nbytes + 2 * 4096


def test_consumption_follows_tensors_through_an_engines_loader() -> None:
    # A toy engine: a fused parameter filled through narrow + cast, one tensor ignored.
    fused = torch.empty(6, 4, dtype=torch.float16)
    tracker = Consumption({"layer.qkv.weight": fused})
    streamed = [("q.weight", torch.ones(4, 4)), ("k.weight", torch.ones(2, 4)),
                ("q.bias", torch.ones(4))]
    with torch.no_grad(), tracker:
        for name, t in tracker.watch(iter(streamed)):
            if name == "q.weight":
                fused.narrow(0, 0, 4).copy_(t.to(torch.float16))
            elif name == "k.weight":
                fused[4:].copy_(t.T.contiguous().T)
    assert dict(tracker.consumed) == {"q.weight": {"layer.qkv.weight"},
                                      "k.weight": {"layer.qkv.weight"}}


def test_local_plan_keeps_the_ranks_experts(tmp_path: Path) -> None:
    moe = {**CONFIG, "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 256,
           "num_attention_heads": 4, "intermediate_size": 512, "moe_intermediate_size": 256,
           "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 512}
    plan = two_source_plan(tmp_path, moe)
    local = local_plan(plan, {"model.layers.0.mlp.experts": {0, 2}})
    experts = {(a.module.layer, a.module.expert) for a in local.assignments
               if a.module.expert is not None}
    assert experts == {(0, 0), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)}
    assert len(local.assignments) == len(plan.assignments) - 2 * 3
    assert local_plan(plan, {}) is plan
