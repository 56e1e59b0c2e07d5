"""A `mixload build` folder refuses checkpoints whose bytes changed after the build.

The plan's fingerprint covers layout only, so a checkpoint re-converted in place (same names,
dtypes, shapes and offsets, other bytes) used to load silently. What the engine adapters run at
every load — lock.verify on the built folder, then stream with its hashes — must refuse it,
naming the file (and with --lock the tensor)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import Qwen3Config

from mixload.core import lock
from mixload.core.cli import main
from mixload.core.config import load
from mixload.core.errors import SourceError
from mixload.core.plan import Plan, build_plan
from mixload.core.stream import stream
from mixload.core.tiny_family import write_random

CONFIG = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=128,
                     tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])
CHANGED = "model.layers.1.mlp.down_proj.weight"   # planned from source b


@pytest.fixture
def mix(tmp_path: Path) -> Path:
    """Two random checkpoints of one model; layer 1 comes from b."""
    write_random(tmp_path / "a", CONFIG, seed=0)
    write_random(tmp_path / "b", CONFIG, seed=1)
    path = tmp_path / "mix.yaml"
    path.write_text(json.dumps({"sources": {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")},
                                "rules": [{"match": "model.layers.1.*", "use": "b"}]}))
    return path


def built(mix: Path, *flags: str) -> tuple[Path, Plan]:
    out = mix.parent / "served"
    assert main(["build", str(mix), "-o", str(out), *flags]) == 0
    return out, build_plan(load(out / "mix.yaml"))


def reconvert_in_place(plan: Plan, name: str) -> Path:
    """Rewrite one planned tensor's bytes as a re-conversion would: same size, same layout."""
    info = next(t for a in plan.assignments for t in a.tensors.values() if t.name == name)
    with open(info.file, "r+b") as f:
        f.seek(info.begin)
        old = f.read(info.nbytes)
        f.seek(info.begin)
        f.write(bytes(b ^ 0x01 for b in old))
    return info.file


def test_a_build_records_each_planned_file_and_an_unchanged_folder_loads(mix: Path) -> None:
    out, plan = built(mix)

    files = json.loads((out / lock.FILES).read_text())["files"]
    shards = {t.file for a in plan.assignments for t in a.tensors.values()}
    assert files == {str(f): {"size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
                     for f in shards}
    assert not (out / lock.LOCK).exists()   # hashing every tensor is --lock's, not the default
    assert lock.verify(plan, out) is None
    assert len(list(stream(plan))) == sum(len(a.tensors) for a in plan.assignments)


def test_a_tensor_rewritten_in_place_is_refused_by_its_files_mtime(mix: Path) -> None:
    out, plan = built(mix)
    shard = reconvert_in_place(plan, CHANGED)

    assert build_plan(load(out / "mix.yaml")).fingerprint == plan.fingerprint   # layout: same
    with pytest.raises(SourceError) as err:
        lock.verify(plan, out)
    assert err.value.file == shard
    assert "changed since `mixload build`" in err.value.what and "mtime" in err.value.what
    assert "mixload build" in err.value.fix and "restore" in err.value.fix


def test_a_file_that_grew_is_refused_naming_both_sizes(mix: Path) -> None:
    out, plan = built(mix)
    shard = mix.parent / "b" / "model.safetensors"
    size = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(b"\0" * 8)

    with pytest.raises(SourceError, match=f"size {size} -> {size + 8} bytes") as err:
        lock.verify(plan, out)
    assert err.value.file == shard


def test_lock_refuses_changed_bytes_even_with_the_mtime_put_back(mix: Path) -> None:
    out, plan = built(mix, "--lock")
    shard = mix.parent / "b" / "model.safetensors"
    before = shard.stat()
    reconvert_in_place(plan, CHANGED)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))

    hashes = lock.verify(plan, out)   # size and mtime say nothing changed...
    assert hashes is not None
    served = []
    with pytest.raises(SourceError) as err:   # ...the bytes do, before the engine gets them
        for name, _ in stream(plan, hashes=hashes):
            served.append(name)
    assert err.value.tensor == CHANGED and err.value.file == shard
    assert CHANGED not in served
    assert "mixload build" in err.value.fix


def test_the_lockfile_names_source_file_offsets_and_hash_of_every_planned_tensor(
        mix: Path) -> None:
    out, plan = built(mix, "--lock")

    locked = json.loads((out / lock.LOCK).read_text())
    assert locked["hash"] == lock.HASH
    for a in plan.assignments:
        for t in a.tensors.values():
            with open(t.file, "rb") as f:
                f.seek(t.begin)
                data = f.read(t.nbytes)
            assert locked["tensors"][t.name] == {"source": a.source, "file": str(t.file),
                                                 "begin": t.begin, "end": t.end,
                                                 "hash": lock.digest(data)}
    # A locked, unchanged folder loads: every planned tensor streams past its hash.
    assert {n for n, _ in stream(plan, hashes=lock.verify(plan, out))} == set(locked["tensors"])


def test_a_folder_without_the_record_checks_nothing(mix: Path) -> None:
    # The SGLang launcher serves a mix YAML and a source folder: no build folder to check.
    plan = build_plan(load(mix))
    assert lock.verify(plan, mix.parent / "a") is None


@pytest.mark.parametrize("record, text", [
    (lock.FILES, "not json"), (lock.FILES, "[]"), (lock.FILES, '{"files": {}}'),
    (lock.LOCK, '{"hash": "md5", "tensors": {}}'), (lock.LOCK, '{"hash": "xxh3-128"}'),
    (lock.LOCK, '{"hash": "xxh3-128", "tensors": {}}')])
def test_a_damaged_record_is_refused_with_the_fix(mix: Path, record: str, text: str) -> None:
    out, plan = built(mix, "--lock")
    (out / record).write_text(text)

    with pytest.raises(SourceError) as err:
        lock.verify(plan, out)
    assert "mixload build" in err.value.fix
