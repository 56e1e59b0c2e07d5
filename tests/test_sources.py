"""Checkpoint folders are read from headers only; every lie in them is a clear error."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import SMALL_MOE, write_yaml
from mixload.core import cli, header_only
from mixload.core.errors import HeaderError, SourceError
from mixload.core.formats import Fp8, Gptq
from mixload.core.formats.base import torch_dtype
from mixload.core.sources import INDEX, open_source, read_header


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _ckpt(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"]}))
    return folder


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def test_reads_only_header_bytes(qwen3_30b: dict[str, Path]) -> None:
    """Opening three 30B checkpoints (~100 GB of tensor data) reads a few MB: the headers."""
    folders = list(qwen3_30b.values())
    data_bytes = sum(f.stat().st_size for d in folders for f in d.glob("*.safetensors"))
    header_bytes = sum(8 + struct.unpack("<Q", f.open("rb").read(8))[0]
                       for d in folders for f in d.glob("*.safetensors"))
    json_bytes = sum(f.stat().st_size for d in folders for f in d.glob("*.json"))
    before = _rchar()
    sources = [open_source(d.name, d) for d in folders]
    read = _rchar() - before
    assert sum(len(s.tensors) for s in sources) > 80_000
    assert data_bytes > 50 * 2**30
    # Everything read is header + json; the slack covers /proc/self/io itself.
    assert header_bytes <= read <= header_bytes + json_bytes + 64 * 1024


def test_detects_formats_and_dtypes(qwen3_30b: dict[str, Path]) -> None:
    fp8 = open_source("fp8", qwen3_30b["fp8"])
    assert fp8.formats == [Fp8(block=(128, 128))]
    assert fp8.module_format("model.layers.0.self_attn.q_proj") == Fp8()
    assert fp8.module_format("model.layers.0.mlp.gate").precision == "bf16"   # router stays BF16
    gptq = open_source("gptq", qwen3_30b["gptq"])
    assert gptq.module_format("model.layers.0.mlp.experts.5.up_proj") == Gptq(group_size=128)
    info = gptq.tensors["model.layers.0.mlp.experts.5.up_proj.qweight"]
    assert (info.dtype, info.shape) == ("I32", (2048 // 8, 768))


def test_single_file_and_real_data(tmp_path: Path) -> None:
    src = open_source("a", _ckpt(tmp_path / "a", {"x.weight": torch.ones(3, 4, dtype=torch.bfloat16)}))
    info = src.tensors["x.weight"]
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        assert torch.frombuffer(bytearray(f.read(info.nbytes)), dtype=torch.bfloat16).eq(1).all()


@pytest.mark.parametrize("header,data,why", [
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "end past"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, "needs 16 bytes"),
    ({"t": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
    ({"t": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, "non-negative"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [8, 0]}}, b"\0" * 16, "backwards"),
    ({"t": {"dtype": "F32", "shape": [4]}}, b"\0" * 16, "data_offsets None"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24, "overlap"),
    ({"__metadata__": "x"}, b"", "__metadata__"),
])
def test_lying_headers(tmp_path: Path, header: dict, data: bytes, why: str) -> None:
    with pytest.raises(HeaderError, match=why) as err:
        read_header(_write_raw(tmp_path / "m.safetensors", header, data))
    assert "m.safetensors" in str(err.value)


F32 = '"dtype": "F32", "shape": [1]'
# Headers the safetensors format forbids (its own parser refuses most of them; a name written
# twice it silently resolves to the last entry): each is a HeaderError naming file and tensor.
FORBIDDEN = {
    "name twice": ('{"a": {%s, "data_offsets": [0, 4]}, "a": {%s, "data_offsets": [4, 8]}}'
                   % (F32, F32), 8, "lists 'a' twice", "a"),
    "field twice": ('{"a": {%s, "data_offsets": [0, 4], "dtype": "F32"}}' % F32, 4,
                    "writes 'dtype' twice", "a"),
    "hole": ('{"a": {%s, "data_offsets": [0, 4]}, "b": {%s, "data_offsets": [8, 12]}}'
             % (F32, F32), 12, "a hole: 4 bytes", "b"),
    "hole at the start": ('{"a": {%s, "data_offsets": [4, 8]}}' % F32, 8, "a hole", "a"),
    "bytes after the last tensor": ('{"a": {%s, "data_offsets": [0, 4]}}' % F32, 8,
                                    "4 bytes after the last tensor", "a"),
    "non-string metadata": ('{"__metadata__": {"step": 3}, "a": {%s, "data_offsets": [0, 4]}}'
                            % F32, 4, r"__metadata__\['step'\] is a JSON number", None),
    "metadata key twice": ('{"__metadata__": {"k": "1", "k": "2"}, '
                           '"a": {%s, "data_offsets": [0, 4]}}' % F32, 4, "writes 'k' twice", None),
    "boolean dim": ('{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', 4,
                    "not a list of non-negative integers", "a"),
    "float dim": ('{"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', 4,
                  "not a list of non-negative integers", "a"),
    "zero dim hiding an overflow": ('{"a": {"dtype": "F32", "shape": [0, 4294967296, 4294967296],'
                                    ' "data_offsets": [0, 0]}}', 0, "overflows 64 bits", "a"),
    "NaN": ('{"a": {%s, "data_offsets": [0, 4], "x": NaN}}' % F32, 4, "not valid JSON", None),
    "not an object": ('[{"a": 1}]', 0, "a JSON array, not an object", None),
}


@pytest.mark.parametrize("text,data,why,tensor", FORBIDDEN.values(), ids=FORBIDDEN.keys())
def test_headers_safetensors_forbids(tmp_path: Path, text: str, data: int, why: str,
                                     tensor: str | None) -> None:
    path = tmp_path / "m.safetensors"
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    with pytest.raises(HeaderError, match=why) as err:
        read_header(path)
    assert err.value.file == path and err.value.tensor == tensor and err.value.fix


def test_what_safetensors_accepts_is_accepted(tmp_path: Path) -> None:
    """Null metadata, an empty file, zero-size tensors and unknown fields are all valid."""
    path = _write_raw(tmp_path / "m.safetensors", {
        "__metadata__": None, "z": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]},
        "a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4], "note": {"k": 1}}}, b"\0" * 4)
    assert {n: t.shape for n, t in read_header(path).items()} == {"z": (0, 5), "a": (2,)}
    assert read_header(_write_raw(tmp_path / "e.safetensors", {}, b"")) == {}


def test_truncated_files(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(HeaderError, match="truncated"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(HeaderError, match="does not fit the file"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(HeaderError, match="not valid JSON"):
        read_header(p)


def _indexed(folder: Path, entry: str) -> Path:
    _ckpt(folder, {"x.weight": torch.zeros(2, 2)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x.weight": entry}}))
    return folder


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_entries_may_not_escape(tmp_path: Path, entry: str) -> None:
    with pytest.raises(SourceError, match="outside the checkpoint folder"):
        open_source("a", _indexed(tmp_path / "a", entry))


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    outside = _ckpt(tmp_path / "elsewhere", {"x.weight": torch.zeros(2, 2)})
    folder = _indexed(tmp_path / "a", "link.safetensors")
    os.symlink(outside / "model.safetensors", folder / "link.safetensors")
    with pytest.raises(SourceError, match="symlink out of the checkpoint folder"):
        open_source("a", folder)


def test_index_naming_a_tensor_the_shard_lacks(tmp_path: Path) -> None:
    folder = _ckpt(tmp_path / "a", {"x.weight": torch.zeros(2, 2)})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"y.weight": "model.safetensors"}}))
    with pytest.raises(HeaderError, match="does not list it") as err:
        open_source("a", folder)
    assert "y.weight" in str(err.value)


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(SourceError, match="pickle") as err:
        open_source("old", folder)
    assert "safetensors" in err.value.fix


def test_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        open_source("a", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="missing file"):
        open_source("a", tmp_path / "empty")


def test_unsupported_quantization_is_named(tmp_path: Path) -> None:
    folder = _ckpt(tmp_path / "bnb", {"x.weight": torch.zeros(2, 2)},
                   {"quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(SourceError, match="'bitsandbytes' is not supported"):
        open_source("bnb", folder)


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    folder = _ckpt(tmp_path / "a", {"x.weight": torch.zeros(2)})
    save_file({"x.weight": torch.zeros(2)}, folder / "model-2.safetensors")
    with pytest.raises(HeaderError, match="two shards"):
        open_source("a", folder)


# ---- what a broken folder says, and the fix

def test_a_source_that_is_a_file(tmp_path: Path) -> None:
    folder = _ckpt(tmp_path / "a", {"x.weight": torch.zeros(2)})
    with pytest.raises(SourceError, match="is a file, not a checkpoint folder") as err:
        open_source("a", folder / "model.safetensors")
    assert str(folder) in err.value.fix


def test_a_shard_that_is_a_folder(tmp_path: Path) -> None:
    folder = _ckpt(tmp_path / "a", {"x.weight": torch.zeros(2)})
    (folder / "model-2.safetensors").mkdir()
    with pytest.raises(SourceError, match="shard is a folder") as err:
        open_source("a", folder)
    assert err.value.file == folder / "model-2.safetensors" and err.value.fix


def test_a_shard_that_is_a_dangling_symlink(tmp_path: Path) -> None:
    folder = _indexed(tmp_path / "a", "link.safetensors")
    os.symlink(folder / "gone.safetensors", folder / "link.safetensors")
    with pytest.raises(SourceError, match="dangling symlink") as err:
        open_source("a", folder)
    assert "re-download" in err.value.fix


@pytest.mark.parametrize("index,why", [
    ('{"weight_map": {"x.weight": "model.safe', "not valid JSON"),
    ('[["x.weight", "model.safetensors"]]', "the index is a JSON array"),
    ('{"weight_map": {"x.weight": "model-00002.safetensors"}}', "names this shard and it is missing"),
])
def test_broken_indexes(tmp_path: Path, index: str, why: str) -> None:
    folder = _ckpt(tmp_path / "a", {"x.weight": torch.zeros(2)})
    (folder / INDEX).write_text(index)
    with pytest.raises(SourceError, match=why) as err:
        open_source("a", folder)
    assert err.value.fix


@pytest.mark.parametrize("config,why", [
    ('[{"architectures": ["LlamaForCausalLM"]}]', "config.json is a JSON array, not an object"),
    ('{"architectures": ', "not valid JSON"),
    ('{"quantization_config": ["fp8"]}', "quantization_config is a list, not an object"),
    ('{"quantization_config": {"quant_method": "gptq", "group_size": 0}}', "group_size = 0"),
])
def test_broken_configs(tmp_path: Path, config: str, why: str) -> None:
    folder = _ckpt(tmp_path / "a", {"x.weight": torch.zeros(2)})
    (folder / "config.json").write_text(config)
    with pytest.raises(SourceError, match=why) as err:
        open_source("a", folder)
    assert str(err.value.file).endswith("config.json") and err.value.fix


# ---- check refuses what convert (through safetensors) or an engine would choke on

def _rewrite(shard: Path, change) -> None:  # type: ignore[no-untyped-def]
    with open(shard, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header, data = json.loads(f.read(n)), f.read()
    text, extra = change(header)
    raw = text.encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data + extra)


def _last_end(header: dict) -> int:
    return max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")


def _name_twice(h: dict) -> tuple[str, bytes]:
    return json.dumps(h)[:-1] + ', "lm_head.weight": ' + json.dumps(h["lm_head.weight"]) + "}", b""


def _hole(h: dict) -> tuple[str, bytes]:
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    h[last]["data_offsets"] = [o + 4 for o in h[last]["data_offsets"]]
    return json.dumps(h), b"\0" * 4


def _with(change):  # type: ignore[no-untyped-def]
    def apply(h: dict) -> tuple[str, bytes]:
        change(h)
        return json.dumps(h), b""
    return apply


BAD_SHARDS = {
    "name twice": _name_twice,
    "hole": _hole,
    "bytes after the last tensor": lambda h: (json.dumps(h), b"\0" * 8),
    "non-string metadata": _with(lambda h: h["__metadata__"].update(step=3)),
    "boolean dim": _with(lambda h: h["model.norm.weight"].update(shape=[True, 256])),
    "zero dim hiding an overflow": _with(lambda h: h.update(ghost={
        "dtype": "F32", "shape": [0, 2**32, 2**32], "data_offsets": [_last_end(h)] * 2})),
}


@pytest.fixture
def small_bf16(tmp_path: Path) -> Path:
    """A small Qwen3-MoE BF16 checkpoint with real (zero) tensors: `convert` reads its data."""
    folder = tmp_path / "bf16"
    folder.mkdir()
    save_file({name: torch.zeros(shape, dtype=torch_dtype(dtype)) for name, (dtype, shape)
               in header_only.tensor_table(SMALL_MOE, None).items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(SMALL_MOE))
    return folder


@pytest.mark.parametrize("change", BAD_SHARDS.values(), ids=BAD_SHARDS.keys())
def test_check_and_convert_refuse_a_bad_shard(small_bf16: Path, tmp_path: Path, change,  # type: ignore[no-untyped-def]
                                              capsys: pytest.CaptureFixture[str]) -> None:
    shard = small_bf16 / "model.safetensors"
    mix = write_yaml(tmp_path / "mix.yaml", {"sources": {"bf16": str(small_bf16)}, "base": "bf16"})
    assert cli.main(["check", str(mix)]) == 0   # the intact checkpoint plans
    _rewrite(shard, change)
    before = shard.read_bytes()
    assert cli.main(["check", str(mix)]) == 2
    assert str(shard) in capsys.readouterr().err.replace("\n", "")
    assert cli.main(["convert", str(small_bf16), "--to", "fp8", "-o", str(tmp_path / "out")]) == 2
    assert str(shard) in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "out").exists() and shard.read_bytes() == before
