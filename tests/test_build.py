"""`build`: the model folder an engine opens — config, plan, mix and tokenizer, no weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mixload.core.build import build
from mixload.core.config import load
from mixload.core.errors import OutputError
from mixload.core.plan import build_plan


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_folder_has_config_plan_and_mix_but_no_weights(small_moe: dict[str, Path],
                                                      tmp_path: Path) -> None:
    (small_moe["bf16"] / "generation_config.json").write_text('{"do_sample": false}')
    (small_moe["bf16"] / "tokenizer.json").write_text("{}")
    mix = write_yaml(tmp_path / "mix.yaml", {
        "sources": {"bf16": "small/bf16", "int4": {"path": "small/gptq", "format": "gptq"}},
        "rules": [{"match": "*.mlp.experts.*", "use": "int4"}]})
    plan = build_plan(load(mix))

    out = build(mix, tmp_path / "served")

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "mixload",
                                             "fingerprint": plan.fingerprint, "mix": "mix.yaml"}
    base = json.loads((small_moe["bf16"] / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == base
    assert json.loads((out / "plan.json").read_text())["fingerprint"] == plan.fingerprint
    assert sorted(p.name for p in out.iterdir()) == [
        ".mixload-output", "config.json", "files.json", "generation_config.json", "mix.yaml",
        "plan.json", "tokenizer.json"]
    normalized = yaml.safe_load((out / "mix.yaml").read_text())
    assert normalized == {
        "sources": {"bf16": {"path": str(small_moe["bf16"])},
                    "int4": {"path": str(small_moe["gptq"]), "format": "gptq"}},
        "base": "bf16", "rules": [{"match": "*.mlp.experts.*", "use": "int4"}],
        "on_conflict": "error"}
    assert build_plan(load(out / "mix.yaml")).fingerprint == plan.fingerprint


def test_seed_form_stays_seed_form_with_absolute_paths(small_moe: dict[str, Path],
                                                       tmp_path: Path) -> None:
    mix = write_yaml(tmp_path / "seed.yaml", {"mixed_precision": {
        "fp16_path": "small/bf16", "fp8_path": "small/fp8",
        "weight_mapping": {"model.layers.0.mlp.experts.0.down_proj.weight": "fp16"}}})
    out = build(mix, tmp_path / "served")
    seed = yaml.safe_load((out / "mix.yaml").read_text())["mixed_precision"]
    assert seed == {"fp16_path": str(small_moe["bf16"]), "fp8_path": str(small_moe["fp8"]),
                    "base_model_path": str(small_moe["fp8"]),
                    "weight_mapping": {"model.layers.0.mlp.experts.0.down_proj.weight": "fp16"},
                    "on_conflict": "promote"}
    assert (build_plan(load(out / "mix.yaml")).fingerprint
            == json.loads((out / "config.json").read_text())["quantization_config"]["fingerprint"])


def test_refuses_to_overwrite_unless_told(small_moe: dict[str, Path], tmp_path: Path) -> None:
    mix = write_yaml(tmp_path / "mix.yaml", {"sources": {"bf16": "small/bf16"}})
    out = build(mix, tmp_path / "served")
    (out / "stale").write_text("x")
    with pytest.raises(OutputError, match="the output folder already exists"):
        build(mix, out)
    assert (out / "stale").exists()
    build(mix, out, overwrite=True)
    assert not (out / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix.yaml", "served", "small"]


def test_vllm_plugin_imports_without_vllm() -> None:
    # vLLM runs the entry point in every process; the core environment has no vLLM at all.
    from mixload.adapters.vllm import plugin

    assert callable(plugin.register) and plugin.mixload_backend() == "vllm"
