"""The mix YAML: both forms, verbatim seed keys, errors that name the key."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mixload.core import cli, config
from mixload.core.errors import ConfigError

from conftest import CONFIGS


def test_seed_form_is_accepted_verbatim() -> None:
    cfg = config.load(CONFIGS / "seed" / "seed-000.yaml")
    assert cfg.form == "seed"
    assert set(cfg.sources) == {"fp16", "fp8", "gptq_int4", "base"}
    assert cfg.base == "base"          # base_model_path is its own folder here
    assert cfg.on_conflict == "promote"
    qkv = next(r for r in cfg.rules if "qkv_proj" in r.pattern)
    assert all(qkv.matches(f"model.layers.0.self_attn.{p}_proj") for p in "qkv")
    assert not qkv.matches("model.layers.1.self_attn.q_proj")


def test_seed_base_defaults_to_fp8_then_first_path() -> None:
    cfg = config.load(CONFIGS / "seed" / "seed-002-qwen3-235b.yaml")
    assert cfg.base == "fp8" and set(cfg.sources) == {"fp16", "fp8", "int4"}
    only = config.parse({"mixed_precision": {"int4_path": "/a", "fp16_path": "/b"}}, Path("m.yaml"))
    assert only.base == "fp16"


def test_rule_form_resolves_paths_relative_to_the_yaml(tmp_path: Path) -> None:
    cfg = config.parse({"sources": {"a": "ckpt-a", "b": {"path": "/abs/b", "format": "gptq"}},
                        "base": "b", "rules": [{"match": "*.mlp.gate_up_proj", "use": "a"}]},
                       tmp_path / "mix.yaml")
    assert cfg.sources["a"].path == str(tmp_path / "ckpt-a")
    assert cfg.sources["b"].format == "gptq"
    rule = cfg.rules[0]
    assert rule.matches("model.layers.3.mlp.up_proj") and not rule.matches("model.layers.3.mlp.down_proj")


@pytest.mark.parametrize("pattern,module,hit", [
    ("*.self_attn.*", "model.layers.0.self_attn.o_proj", True),
    ("*.q_proj.weight", "model.layers.0.self_attn.q_proj", True),
    ("re:model\\.layers\\.(0|47)\\..*", "model.layers.47.mlp.experts.3.up_proj", True),
    ("re:model\\.layers\\.(0|47)\\..*", "model.layers.4.mlp.experts.3.up_proj", False),
    ("*.self_attn.qkv_proj", "model.layers.9.self_attn.v_proj", True),
])
def test_rule_matching(pattern: str, module: str, hit: bool) -> None:
    assert config.NormalizedRule(pattern, "x", "test").matches(module) is hit


@pytest.mark.parametrize("data,key", [
    ({"sources": {"a": "/x"}, "rules": [{"match": "*", "use": "a", "typo": 1}]}, "rules.0.typo"),
    ({"sources": {"a": "/x"}, "base": "nope"}, "base 'nope' is not a source"),
    ({"sources": {"a": "/x"}, "rules": [{"match": "*", "use": "b"}]}, "rules[0].use 'b'"),
    ({"sources": {"a": "/x"}, "on_conflict": "merge"}, "on_conflict"),
    ({"sources": {"a": {"path": "/x", "format": "int3"}}}, "sources.a"),
    ({"mixed_precision": {"fp16_path": "/x", "weight_mapping": {"w": "int8"}}},
     "mixed_precision.weight_mapping.w"),
    ({"mixed_precision": {"fp16_path": "/x", "weight_mapping": {"w": "awq_int4"}}},
     "awq_int4_path is not set"),
    ({"mixed_precision": {"fp16_path": "/x", "fp32_path": "/y"}}, "mixed_precision.fp32_path"),
    ([1, 2], "a mix config must be a mapping"),
])
def test_bad_config_names_the_key(data: object, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(data, Path("/cfg/mix.yaml"))
    assert key in str(err.value) and "/cfg/mix.yaml" in str(err.value)


def test_bad_regex_names_the_rule() -> None:
    with pytest.raises(ConfigError, match=r"invalid regex(.|\n)*rules\[0\]"):
        config.parse({"sources": {"a": "/x"}, "rules": [{"match": "re:(", "use": "a"}]}, Path("m"))


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: {a: /x\nrules: [")
    with pytest.raises(ConfigError, match="malformed YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")


def test_json_schema_covers_both_forms() -> None:
    schema = json.loads(config.json_schema())
    text = json.dumps(schema)
    assert "weight_mapping" in text and "on_conflict" in text and "gptq_int4_path" in text


# The strict loader: what PyYAML would let through silently, or crash on, is a ConfigError
# naming the file, the line and the fix.

def _load_text(tmp_path: Path, text: str | bytes) -> config.MixConfig:
    p = tmp_path / "mix.yaml"
    if isinstance(text, str):
        p.write_text(text, encoding="utf-8")
    else:
        p.write_bytes(text)
    return config.load(p)


@pytest.mark.parametrize("text,key,lines", [
    ("sources: {a: /x}\nrules:\n  - {match: '*.mlp.*', use: a}\nbase: a\nrules: []\n",
     "'rules'", "lines 2 and 5"),
    ("sources:\n  int4: /x\n  fp8: /y\n  int4: /z\n", "'int4'", "lines 2 and 4"),
    ("mixed_precision:\n  fp8_path: /x\n  weight_mapping:\n"
     "    model.layers.0.mlp.experts.0.up_proj.weight: fp8\n"
     "    model.layers.0.mlp.experts.1.up_proj.weight: fp8\n"
     "    model.layers.0.mlp.experts.0.up_proj.weight: fp8\n",
     "'model.layers.0.mlp.experts.0.up_proj.weight'", "lines 4 and 6"),
])
def test_a_key_written_twice_names_both_lines(tmp_path: Path, text: str, key: str,
                                              lines: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load_text(tmp_path, text)
    msg = str(err.value)
    assert f"key {key} is written twice" in msg and lines in msg
    assert "mix.yaml" in msg and f"fix: keep one {key}" in msg


def test_merge_keys_may_override_and_anchors_may_be_reused(tmp_path: Path) -> None:
    cfg = _load_text(tmp_path, "sources:\n  a: &spec {path: /x, format: fp8}\n"
                               "  b: {<<: *spec, path: /y}\n"
                               "rules:\n  - {match: &experts '*.mlp.experts.*', use: b}\n"
                               "  - {match: *experts, use: a}\n")
    assert (cfg.sources["b"].path, cfg.sources["b"].format) == ("/y", "fp8")
    assert [r.pattern for r in cfg.rules] == ["*.mlp.experts.*"] * 2


def test_a_1kb_alias_bomb_fails_fast(tmp_path: Path) -> None:
    # "billion laughs": 9 levels of 9 aliases each, 9^9 values from 1 KB of text
    text = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    text += "sources: {x: /x}\non_conflict: *i\n"
    assert len(text) < 1024
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb(.|\n)*fix: write the values out"):
        _load_text(tmp_path, text)
    assert time.perf_counter() - t < 1


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"alias \*r \(line 2\) is used inside its own anchor"):
        _load_text(tmp_path, "sources: {x: /x}\nrules: &r [*r]\n")


@pytest.mark.parametrize("text", [
    "sources:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(3000)),   # block style
    "sources: " + "[" * 600 + "]" * 600 + "\n",                                     # flow style
])
def test_nesting_thousands_deep_is_a_clear_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="nested more than 32 levels deep|maximum nesting depth"):
        _load_text(tmp_path, text)


@pytest.mark.parametrize("content,what", [
    (b"", "the mix config is empty"),
    (b"# rules to come\n", "the mix config is empty"),
    (b"sources:\n  a: /models/Qwen3-\xe9\n", "not UTF-8 text: byte 0xe9 at line 2"),
    (b"- sources\n- rules\n", "must be a mapping, not a list"),
    (b"mixed_precision\n", "must be a mapping, not a string"),
    (b"\xef\xbb\xbfsources: {a: /x}\nrules: [{match: '*', use: b}]\n", "rules[0].use 'b'"),  # BOM ok
])
def test_unusable_documents_say_how_to_fix_them(tmp_path: Path, content: bytes, what: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load_text(tmp_path, content)
    assert what in str(err.value) and "\n  fix: " in str(err.value)


# Rules compile one at a time: a bad one is named by its position and text.

@pytest.mark.parametrize("pattern,why", [
    ("re:model\\.layers\\.0(?i)\\..*", "global flags not at the start"),
    ("re:model\\.layers\\.[", "unterminated character set"),
    ("re:" + "(" * 3000 + "x" + ")" * 3000, "nested too deeply"),
    ("re:x{99999999999}", "the repetition number is too large"),
])
def test_a_bad_regex_names_the_rule(pattern: str, why: str) -> None:
    rules = [{"match": "*.self_attn.*", "use": "a"}, {"match": pattern, "use": "a"}]
    with pytest.raises(ConfigError) as err:
        config.parse({"sources": {"a": "/x"}, "rules": rules}, Path("/cfg/mix.yaml"))
    msg = str(err.value)
    assert f"invalid regex in rule 2 of `rules:`: {why}" in msg
    assert "rule: rules[1]: match" in msg and "\n  fix: " in msg


@pytest.mark.parametrize("pattern,module,hit", [
    # a leading inline flag applies to the whole regex, as in Python
    ("re:(?i)MODEL\\.LAYERS\\.0\\..*", "model.layers.0.mlp.experts.3.up_proj", True),
    # a named group survives the fused-name expansion (qkv_proj -> q/k/v_proj)
    ("re:model\\.layers\\.(?P<layer>[0-3])\\.self_attn\\.qkv_proj", "model.layers.2.self_attn.v_proj", True),
    ("re:model\\.layers\\.(?P<layer>[0-3])\\.self_attn\\.qkv_proj", "model.layers.5.self_attn.v_proj", False),
])
def test_inline_flags_and_named_groups_work(pattern: str, module: str, hit: bool) -> None:
    cfg = config.parse({"sources": {"a": "/x"}, "rules": [{"match": pattern, "use": "a"}]},
                       Path("m.yaml"))
    assert cfg.rules[0].matches(module) is hit


def test_explain_with_an_invalid_regex_exits_2(small_moe: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources: {{fp8: {small_moe['fp8']}}}\n")
    assert cli.main(["explain", str(mix), "re:["]) == 2
    err = capsys.readouterr().err
    assert "invalid regex in the name 're:['" in err and "fix:" in err and "Traceback" not in err
