"""`mixload plan | check | explain | schema` as a user runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_yaml


def mixload(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mixload.core.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _snapshot(folders: list[Path]) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for d in folders for p in sorted(d.rglob("*"))}


@pytest.fixture
def mix(small_moe: dict[str, Path], tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "mix.yaml", {
        "sources": {k: str(v) for k, v in small_moe.items()}, "base": "fp8",
        "rules": [{"match": "*.mlp.experts.*", "use": "gptq"}, {"match": "*.self_attn.*", "use": "bf16"}]})


def test_plan_prints_the_table_and_memory(mix: Path) -> None:
    r = mixload("plan", mix, "--tp", 2)
    assert r.returncode == 0, r.stderr
    assert "Plan per layer" in r.stdout and "gptq-int4-g128 (gptq)" in r.stdout
    assert "of all-BF16" in r.stdout and "per rank (TP=2, EP=1)" in r.stdout


def test_plan_json(mix: Path) -> None:
    r = mixload("plan", mix, "--json")
    plan = json.loads(r.stdout)
    q = next(m for m in plan["modules"] if m["name"] == "model.layers.0.self_attn.q_proj")
    assert (q["source"], q["format"], q["origin"]) == ("bf16", "bf16", "rules[1]: match '*.self_attn.*' -> bf16")
    assert plan["memory"]["by_precision"].keys() == {"bf16", "int4"}   # fp8 base: only BF16 norms etc.


def test_check_ok_and_explain(mix: Path) -> None:
    r = mixload("check", mix, "--tp", 2)
    assert r.returncode == 0 and r.stdout.startswith("OK:")
    r = mixload("explain", mix, "model.layers.1.mlp.experts.3.down_proj.qweight")
    assert r.returncode == 0
    assert "rules[0]: match '*.mlp.experts.*' -> gptq" in r.stdout
    assert "model.layers.1.mlp.experts.3.down_proj.scales" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["check", "{mix}", "--tp", "3"], "not divisible by TP=3"),
    (["plan", "{tmp}/missing.yaml"], "mix config not found"),
    (["explain", "{mix}", "model.layers.9.mlp.experts.0.up_proj"], "no module of the model is named"),
])
def test_bad_input_exits_2_without_traceback_and_touches_nothing(
        mix: Path, small_moe: dict[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    before = _snapshot(list(small_moe.values()))
    listing = sorted(os.listdir(tmp_path))
    r = mixload(*(a.format(mix=mix, tmp=tmp_path) for a in args))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert _snapshot(list(small_moe.values())) == before and sorted(os.listdir(tmp_path)) == listing


def test_check_lists_every_problem(small_moe: dict[str, Path], tmp_path: Path) -> None:
    bad = write_yaml(tmp_path / "bad.yaml", {
        "sources": {"fp8": str(small_moe["fp8"]), "gone": str(tmp_path / "gone")},
        "base": "fp8", "rules": [{"match": "*.self_attn.k_proj", "use": "gone"}]})
    r = mixload("check", bad, "--tp", 3)
    assert r.returncode == 2
    assert "folder does not exist" in r.stderr and "not divisible by TP=3" in r.stderr


def test_schema_is_json() -> None:
    r = mixload("schema")
    assert r.returncode == 0 and "mixed_precision" in json.loads(r.stdout)["anyOf"][0]["properties"]


def test_convert_then_plan_the_result(small_moe: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "awq"
    r = mixload("convert", small_moe["bf16"], "--to", "awq-int4", "-o", out)
    assert r.returncode == 0, r.stderr
    again = mixload("convert", small_moe["bf16"], "--to", "awq-int4", "-o", out)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    mix = write_yaml(tmp_path / "m.yaml", {"sources": {"bf16": str(small_moe["bf16"]), "awq": str(out)},
                                           "rules": [{"match": "*.mlp.experts.*", "use": "awq"}]})
    r = mixload("plan", mix)
    assert r.returncode == 0 and "awq-int4-g128 (awq)" in r.stdout


def test_build_writes_the_folder_an_engine_opens(mix: Path, tmp_path: Path) -> None:
    r = mixload("build", mix, "-o", tmp_path / "served")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "served" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mixload"
    assert mixload("build", mix, "-o", tmp_path / "served").returncode == 2   # no silent overwrite


def test_serve_names_the_missing_adapter() -> None:
    r = mixload("serve", "tgi", "--port", "1")
    assert r.returncode == 2 and 'pip install "mixload[sglang]"' in r.stderr
