"""The mix YAML: both forms, verbatim seed keys, errors that name the key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixload.core import config
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
