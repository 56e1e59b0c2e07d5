"""Fuzzing: whatever the YAML or the safetensors header holds, only our own errors come out."""
from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixload.core import config
from mixload.core.errors import MixloadError
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
