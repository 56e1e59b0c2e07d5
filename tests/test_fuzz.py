"""Fuzzing: whatever the YAML or the safetensors header holds, only our own errors come out."""
from __future__ import annotations

import json
import struct
import tempfile
from math import prod
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixload.core import config
from mixload.core.errors import MixloadError
from mixload.core.formats import DTYPE_BYTES
from mixload.core.sources import read_header

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=12) | st.floats()
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
keys = st.sampled_from(["sources", "base", "rules", "on_conflict", "match", "use", "path",
                        "format", "mixed_precision", "fp16_path", "fp8_path", "int4_path",
                        "weight_mapping", "base_model_path", "x"])
configs = st.recursive(scalars | st.sampled_from(["fp16", "fp8", "int4", "re:(", "*", "a"]),
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(keys | st.text(max_size=5), inner, max_size=5),
                       max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(configs)
def test_config_parser_raises_only_config_errors(data: object) -> None:
    try:
        config.parse(data, Path("/fuzz/mix.yaml"))
    except MixloadError:
        pass


# YAML-ish text: the tokens that make anchors, aliases, merges, tags, nesting and duplicates.
yaml_tokens = st.sampled_from(["sources", "rules", "match", "use", "base", "mixed_precision",
                               "weight_mapping", "fp8", "a", ":", ": ", " ", "  ", "\n", "- ", "[",
                               "]", "{", "}", ", ", "&a ", "*a", "&b ", "*b", "<<: ", "? ", "!!int ",
                               "!!binary ", "!!timestamp ", "2024-13-45", "'", '"', "#", "---\n",
                               "\t", "\x00", "\ufeff", "é", "re:(", "*.mlp.*", "~", "1e999"])
yaml_texts = st.text(max_size=200) | st.lists(yaml_tokens, max_size=60).map("".join)


def _load(content: str | bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "mix.yaml"
        if isinstance(content, str):
            p.write_text(content, encoding="utf-8")
        else:
            p.write_bytes(content)
        try:
            config.load(p)
        except MixloadError:
            pass


@settings(max_examples=400, deadline=None)
@given(yaml_texts)
def test_yaml_text_raises_only_config_errors(text: str) -> None:
    _load(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | yaml_texts.map(lambda t: t.encode("utf-16")))
def test_yaml_bytes_raise_only_config_errors(blob: bytes) -> None:
    _load(blob)


def _flow_yaml(value: object, dup: object) -> str:
    """`value` as flow-style YAML, one mapping key per line, with the first key of the mapping
    `dup` written a second time (with another value) at its end."""
    if isinstance(value, dict):
        items = [f"{json.dumps(k)}: {_flow_yaml(v, dup)}" for k, v in value.items()]
        if value is dup:
            items.append(f"{json.dumps(next(iter(value)))}: [again]")
        return "{\n" + ",\n".join(items) + "\n}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow_yaml(v, dup) for v in value) + "]"
    return json.dumps(value)


def _mappings(value: object) -> list[dict]:
    if isinstance(value, dict):
        return [value] + [m for v in value.values() for m in _mappings(v)]
    return [m for v in value for m in _mappings(v)] if isinstance(value, list) else []


plain = st.none() | st.booleans() | st.integers(-9, 9) | st.text("abc._*", max_size=6)
documents = st.recursive(plain, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(keys | st.text("xyz", min_size=1, max_size=3), inner,
                                           min_size=1, max_size=4), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, documents, min_size=1, max_size=4), st.data())
def test_a_duplicate_key_is_caught_wherever_it_is(doc: dict, data: st.DataObject) -> None:
    dup = data.draw(st.sampled_from(_mappings(doc)))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "mix.yaml"
        p.write_text(_flow_yaml(doc, dup), encoding="utf-8")
        try:
            config.load(p)
        except MixloadError as exc:
            assert f"key {next(iter(dup))!r} is written twice" in str(exc)
            return
    raise AssertionError("a duplicate key was loaded silently")


entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "BF16", "I32", "F8_E4M3", "Q4"]) | json_values,
    "shape": st.lists(st.integers(-3, 40), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-10, 400), min_size=0, max_size=3) | json_values,
}) | json_values
headers = st.dictionaries(st.text(max_size=6), entries, max_size=5)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers, st.integers(0, 300), st.booleans(), st.binary(max_size=16))
def test_header_parser_raises_only_header_errors(header: dict, data_len: int, mangle: bool,
                                                 junk: bytes) -> None:
    raw = json.dumps(header).encode()
    if mangle:
        raw = raw[: len(raw) // 2] + junk
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
        try:
            tensors = read_header(p)
        except MixloadError:
            return
        for t in tensors.values():   # what is accepted is consistent
            assert 8 + len(raw) <= t.begin <= t.end <= p.stat().st_size


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_files_raise_only_header_errors(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        p.write_bytes(blob)
        try:
            read_header(p)
        except MixloadError:
            pass


def test_yaml_round_trip_of_a_real_config() -> None:
    data = {"sources": {"a": "/x"}, "rules": [{"match": "*.mlp.*", "use": "a"}]}
    assert config.parse(yaml.safe_load(yaml.safe_dump(data)), Path("m.yaml")).rules[0].use == "a"


# ---- the quantization_config reader: only our own errors; what it accepts the planner can use

def _qc_values() -> st.SearchStrategy[object]:
    near = st.integers(-3, 300) | st.sampled_from([-1, 4, 8, 64, 128, 2**64])
    return near | json_values | st.lists(near, max_size=3)


ct_weights = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["int", "float", "x"]) | json_values,
    "num_bits": st.sampled_from([4, 8, 4.0, True]) | _qc_values(),
    "strategy": st.sampled_from(["group", "channel", "tensor", "block", "token"]) | json_values,
    "group_size": _qc_values(), "symmetric": st.booleans() | json_values,
    "block_structure": _qc_values(), "dynamic": st.booleans() | json_values})
ct_groups = st.dictionaries(st.text(max_size=4), st.fixed_dictionaries({}, optional={
    "weights": ct_weights | json_values, "input_activations": ct_weights | json_values,
    "format": st.sampled_from(["pack-quantized", "int-quantized"])}) | json_values, max_size=2)
quantization_configs = st.fixed_dictionaries({}, optional={
    "quant_method": st.sampled_from(["fp8", "gptq", "gptq_marlin", "awq", "awq_marlin",
                                     "compressed-tensors", "bitsandbytes"]) | json_values,
    **{k: _qc_values() for k in ("bits", "w_bit", "group_size", "q_group_size",
                                 "weight_block_size")},
    **{k: st.booleans() | json_values for k in ("sym", "desc_act", "zero_point")},
    "checkpoint_format": st.sampled_from(["gptq", "gptq_v2"]) | json_values,
    "activation_scheme": st.sampled_from(["dynamic", "static"]) | json_values,
    "fmt": st.sampled_from(["e4m3", "e5m2"]) | json_values,
    "version": st.sampled_from(["gemm", "GEMM", "gemv"]) | json_values,
    "format": st.sampled_from(["pack-quantized", "float-quantized"]) | json_values,
    "config_groups": ct_groups | json_values,
}) | json_values


@settings(max_examples=600, deadline=None)
@given(quantization_configs)
def test_quantization_config_reader_raises_only_our_errors(qc: object) -> None:
    from mixload.core.formats import detect
    try:
        formats = detect(qc, "config.json")
    except MixloadError:
        return
    for fmt in formats:   # what is accepted, the planner can size and split
        for parallel in ("column", "row"):
            fmt.tensor_shapes(512, 1024)
            fmt.tp_problems(512, 1024, parallel, 2)


# ---- the header parser: raw JSON (names and fields written twice, booleans, NaN ...)

def _raw_json(value: object) -> str:
    """JSON text of `value`, where a list of (key, value) pairs is an object with repeats kept."""
    if isinstance(value, tuple):
        return "{" + ", ".join(f"{json.dumps(k)}: {_raw_json(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_raw_json, value)) + "]"
    return json.dumps(value)


raw_entries = st.lists(st.tuples(st.sampled_from(["dtype", "shape", "data_offsets", "x"]),
                                 st.sampled_from(["F32", "BF16", "I8"])
                                 | st.lists(st.integers(0, 16) | st.booleans(), max_size=3)
                                 | json_values), max_size=4).map(tuple)
raw_headers = st.lists(st.tuples(st.sampled_from(["a", "b", "__metadata__"]) | st.text(max_size=3),
                                 raw_entries | json_values), max_size=5).map(tuple)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_headers, st.integers(0, 64))
def test_raw_headers_raise_only_header_errors(header: tuple, data_len: int) -> None:
    raw = _raw_json(header).encode()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
        try:
            read_header(p)
        except MixloadError:
            pass


# ---- differential: whatever our parser accepts, safetensors itself loads

DTYPES = sorted(DTYPE_BYTES)
tensor_specs = st.lists(st.tuples(st.text("abc.", min_size=1, max_size=4),
                                  st.sampled_from(DTYPES),
                                  st.lists(st.integers(0, 5), max_size=3)), max_size=5)
FLAWS = ["none", "hole", "overlap", "trailing", "name twice", "bool dim", "metadata int",
         "metadata null", "zero dim overflow", "unknown dtype", "extra field", "shuffled"]


def _valid_ish(specs: list, flaw: str, pick: int) -> tuple[str, bytes]:
    """A header of `specs` laid out back to back, then broken (or not) by `flaw`."""
    entries, off = [], 0
    for name, dtype, shape in specs:
        n = DTYPE_BYTES[dtype] * prod(shape)
        entries.append([name, {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}])
        off += n
    meta: object = {"format": "pt"}
    extra = b""
    target = entries[pick % len(entries)][1] if entries else None
    if flaw == "hole" and target:
        target["data_offsets"] = [o + 1 for o in target["data_offsets"]]
        extra = b"\0"
    elif flaw == "overlap" and target and target["data_offsets"][0]:
        target["data_offsets"] = [o - 1 for o in target["data_offsets"]]
    elif flaw == "trailing":
        extra = b"\0" * (pick % 3 + 1)
    elif flaw == "name twice" and entries:
        entries.append(list(entries[pick % len(entries)]))
    elif flaw == "bool dim" and target:
        target["shape"] = [True, *target["shape"]]
    elif flaw == "metadata int":
        meta = {"format": "pt", "step": pick}
    elif flaw == "metadata null":
        meta = None
    elif flaw == "zero dim overflow":
        entries.append(["ghost", {"dtype": "F32", "shape": [0, 2**40, 2**40],
                                  "data_offsets": [off, off]}])
    elif flaw == "unknown dtype" and target:
        target["dtype"] = "F4"
    elif flaw == "extra field" and target:
        target["note"] = {"k": [1, {"x": None}]}
    elif flaw == "shuffled":
        entries.reverse()
    body = [f'"__metadata__": {json.dumps(meta)}'] + [f"{json.dumps(n)}: {json.dumps(e)}"
                                                     for n, e in entries]
    return "{" + ", ".join(body) + "}", b"\x01" * off + extra


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_specs, st.sampled_from(FLAWS), st.integers(0, 10))
def test_what_we_accept_safetensors_loads(specs: list, flaw: str, pick: int) -> None:
    from safetensors import safe_open

    from mixload.core.formats.base import safetensors_dtype
    text, data = _valid_ish(specs, flaw, pick)
    raw = text.encode()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        try:
            tensors = read_header(p)
        except MixloadError:
            # a sound header of distinct names is never refused: we are not stricter for nothing
            assert flaw not in ("none", "metadata null", "extra field", "shuffled") \
                or len({n for n, _, _ in specs}) < len(specs)
            return
        with safe_open(p, framework="pt") as f:
            assert set(f.keys()) == set(tensors)
            for name, info in tensors.items():
                t = f.get_tensor(name)
                assert (tuple(t.shape), safetensors_dtype(t.dtype)) == (info.shape, info.dtype)
