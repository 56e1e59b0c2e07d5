"""The plan: what is loaded from where, its memory, and every reason it would fail."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from mixload.core import config, header_only
from mixload.core.errors import PlanError
from mixload.core.plan import build_plan

from conftest import SMALL_MOE, seed_yaml, write_yaml

CLASSIC = {"rules": [{"match": "*.mlp.experts.*", "use": "gptq"},
                     {"match": "*.self_attn.*", "use": "bf16"}]}


def _mix(tmp: Path, family: dict[str, Path], **extra: object) -> config.MixConfig:
    data = {"sources": {k: str(v) for k, v in family.items()}, "base": "fp8", **extra}
    return config.load(write_yaml(tmp / "mix.yaml", data))


def test_seed_000_plans_on_qwen3_30b(qwen3_30b: dict[str, Path], tmp_path: Path) -> None:
    path = seed_yaml("seed-000.yaml", {"/path/to/fp16/model": qwen3_30b["bf16"],
                                       "/path/to/fp8/model": qwen3_30b["fp8"],
                                       "/path/to/gptq/model": qwen3_30b["gptq"],
                                       "/path/to/base/model": qwen3_30b["fp8"]}, tmp_path / "s.yaml")
    plan = build_plan(config.load(path))
    rows = plan.by_name()
    # qkv_proj expanded to q/k/v, from the fp16 (here: BF16) checkpoint
    assert {rows[f"model.layers.0.self_attn.{p}_proj"].source for p in "qkv"} == {"fp16"}
    # expert 0 down asked for int4, gate for fp8: the MoE layer is one fused group, promoted to fp8
    assert rows["model.layers.0.mlp.experts.0.down_proj"].format.label() == "fp8-block"
    assert any("promoted" in w and "layers.0.mlp.experts" in w for w in plan.warnings)
    assert rows["model.layers.1.self_attn.q_proj"].source == "fp8"     # base_model_path


def test_seed_002_plans_with_warnings_for_dense_names(qwen3_30b: dict[str, Path], tmp_path: Path) -> None:
    path = seed_yaml("seed-002-qwen3-235b.yaml", {
        "/dcar-vepfs-trans-models/Qwen3-235B-A22B": qwen3_30b["bf16"],
        "/dcar-vepfs-trans-models/Qwen3-235B-A22B-FP8": qwen3_30b["fp8"],
        "/dcar-vepfs-trans-models/Qwen3-235B-A22B-GPTQ-Int4": qwen3_30b["gptq"]}, tmp_path / "s.yaml")
    plan = build_plan(config.load(path))
    assert plan.by_name()["lm_head"].source == "fp16"
    assert sum("matches no module" in w for w in plan.warnings) == 3   # mlp.{gate,up,down}_proj


def test_classic_mix_memory(qwen3_30b: dict[str, Path], tmp_path: Path) -> None:
    plan = build_plan(_mix(tmp_path, qwen3_30b, **CLASSIC), tp=2)
    mem = plan.memory()
    assert set(mem["by_precision"]) == {"bf16", "int4"}
    assert mem["by_kind"]["experts"] == mem["by_precision"]["int4"]
    assert 0.25 < mem["total_bytes"] / mem["all_bf16_bytes"] < 0.35
    # TP=2 halves every sharded tensor; norms, the router and the GPTQ g_idx of
    # column-parallel experts (it indexes the unsplit input) are replicated
    g_idx = sum(a.tensors["g_idx"].nbytes for a in plan.assignments
                if "g_idx" in a.tensors and a.module.parallel == "column")
    replicated = mem["by_kind"]["norm"] + mem["by_kind"]["router"] + g_idx
    assert mem["per_rank_bytes"] == pytest.approx((mem["total_bytes"] - replicated) / 2 + replicated,
                                                  rel=1e-3)
    assert plan.to_json()["sources"]["gptq"]["files"]


def test_per_rank_bytes_replicate_kv_heads_beyond_tp(qwen3_30b: dict[str, Path], tmp_path: Path) -> None:
    plan = build_plan(_mix(tmp_path, qwen3_30b, rules=[{"match": "*", "use": "bf16"}]), tp=8)
    k = plan.by_name()["model.layers.0.self_attn.k_proj"]
    assert k.rank_bytes(8, 1) == k.nbytes // 4      # 4 KV heads over 8 ranks: 2 ranks per head


def test_fused_group_split_is_an_error_by_default(small_moe: dict[str, Path], tmp_path: Path) -> None:
    cfg = _mix(tmp_path, small_moe, rules=[{"match": "*.self_attn.q_proj", "use": "gptq"}])
    with pytest.raises(PlanError, match=r"layers\.\*\.self_attn\.qkv_proj in 2 layers \(0-1\) is split across formats") as err:
        build_plan(cfg)
    assert "on_conflict" in str(err.value) and "rules[0]" in str(err.value)


@pytest.mark.parametrize("mode,label", [("promote", "fp8-block"), ("demote", "gptq-int4-g128")])
def test_on_conflict_promote_and_demote(small_moe: dict[str, Path], tmp_path: Path, mode: str,
                                        label: str) -> None:
    cfg = _mix(tmp_path, small_moe, on_conflict=mode,
               rules=[{"match": "*.experts.0.*", "use": "gptq"}])
    plan = build_plan(cfg)
    experts = [a for a in plan.assignments if a.module.kind == "experts"]
    assert {a.format.label() for a in experts} == {label}


def test_tp_indivisible_group_is_named(qwen3_30b: dict[str, Path], tmp_path: Path) -> None:
    cfg = _mix(tmp_path, qwen3_30b, rules=[{"match": "*", "use": "fp8"}])
    with pytest.raises(PlanError) as err:
        build_plan(cfg, tp=4)       # experts 768 / 4 = 192: not a multiple of the FP8 block
    text = str(err.value)
    assert "192 is not a multiple of 128" in text and "model.layers.*.mlp.experts" in text
    assert "48 layers (0-47)" in text
    build_plan(cfg, tp=2)           # 384 = 3 x 128 fits


def test_ep_checks_experts_not_tp(qwen3_30b: dict[str, Path], tmp_path: Path) -> None:
    cfg = _mix(tmp_path, qwen3_30b, rules=[{"match": "*", "use": "fp8"}])
    plan = build_plan(cfg, tp=4, ep=4)   # with EP the experts stay whole
    assert plan.memory()["per_rank_bytes"] < plan.memory()["total_bytes"] / 3
    with pytest.raises(PlanError, match="128 experts are not divisible by EP=3"):
        build_plan(cfg, tp=1, ep=3)


def test_architecture_mismatch(small_moe: dict[str, Path], tmp_path: Path) -> None:
    other = header_only.write(tmp_path / "other", {**SMALL_MOE, "num_hidden_layers": 3})
    cfg = _mix(tmp_path, {**small_moe, "bf16": other})
    with pytest.raises(PlanError, match="sources disagree on num_hidden_layers: 'fp8' has 2, 'bf16' has 3"):
        build_plan(cfg)


def test_missing_tensor_names_source_and_tensor(small_moe: dict[str, Path], tmp_path: Path) -> None:
    index = small_moe["gptq"] / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.layers.1.self_attn.o_proj.scales"]
    index.write_text(json.dumps(data))
    cfg = _mix(tmp_path, small_moe, rules=[{"match": "*.o_proj", "use": "gptq"}])
    with pytest.raises(PlanError) as err:
        build_plan(cfg)
    assert "model.layers.1.self_attn.o_proj.scales" in str(err.value)
    assert "'gptq'" in str(err.value)


def test_shape_mismatch(small_moe: dict[str, Path], tmp_path: Path) -> None:
    wide = header_only.write(tmp_path / "wide", {**SMALL_MOE, "moe_intermediate_size": 384})
    wide_cfg = json.loads((wide / "config.json").read_text())
    wide_cfg["moe_intermediate_size"] = 256           # a config that lies about its tensors
    (wide / "config.json").write_text(json.dumps(wide_cfg))
    cfg = _mix(tmp_path, {**small_moe, "wide": wide}, rules=[{"match": "*.experts.*", "use": "wide"}])
    with pytest.raises(PlanError, match=r"shape \[384, 256\] does not match the model"):
        build_plan(cfg)


def test_declared_format_is_checked(small_moe: dict[str, Path], tmp_path: Path) -> None:
    data = {"sources": {"fp8": str(small_moe["fp8"]), "int4": {"path": str(small_moe["bf16"]),
                                                               "format": "gptq"}}}
    with pytest.raises(PlanError, match="'int4' is declared gptq but its checkpoint is bf16"):
        build_plan(config.load(write_yaml(tmp_path / "m.yaml", data)))


def test_every_problem_is_listed_at_once(small_moe: dict[str, Path], tmp_path: Path) -> None:
    shutil.rmtree(small_moe["bf16"])
    cfg = _mix(tmp_path, small_moe, rules=[{"match": "*.self_attn.q_proj", "use": "gptq"}])
    with pytest.raises(PlanError) as err:
        build_plan(cfg)
    assert len(err.value.problems) == 2   # the missing folder; the qkv split, once for 2 layers
    assert "self_attn.qkv_proj in 2 layers (0-1) is split" in str(err.value)


def test_fingerprint_is_stable_and_sensitive(small_moe: dict[str, Path], tmp_path: Path) -> None:
    a = build_plan(_mix(tmp_path, small_moe, **CLASSIC))
    b = build_plan(_mix(tmp_path, small_moe, **CLASSIC), tp=2)
    c = build_plan(_mix(tmp_path, small_moe, rules=[{"match": "*.self_attn.*", "use": "bf16"}]))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_first_match_wins_between_names_and_patterns(small_moe: dict[str, Path], tmp_path: Path) -> None:
    rules = [{"match": "*.mlp.experts.*", "use": "gptq"},
             {"match": "model.layers.0.mlp.experts.1.up_proj", "use": "bf16"},     # loses: a glob above took it
             {"match": "model.layers.1.self_attn.o_proj.weight", "use": "bf16"},  # wins: written first
             {"match": "*.self_attn.o_proj", "use": "gptq"},
             {"match": "model.layers.9.mlp.experts.0.up_proj", "use": "bf16"}]    # no layer 9
    plan = build_plan(_mix(tmp_path, small_moe, rules=rules))
    rows = plan.by_name()
    assert (rows["model.layers.0.mlp.experts.1.up_proj"].source,
            rows["model.layers.0.mlp.experts.1.up_proj"].origin) == ("gptq", "rules[0]: match '*.mlp.experts.*' -> gptq")
    assert rows["model.layers.1.self_attn.o_proj"].source == "bf16"
    assert rows["model.layers.0.self_attn.o_proj"].source == "gptq"
    # a rule that lost everywhere still matches a module, so only the layer-9 rule is reported
    assert plan.warnings == ["rules[4]: match 'model.layers.9.mlp.experts.0.up_proj' -> bf16 "
                             "matches no module of the model"]


def test_seed_names_for_one_module_must_agree(small_moe: dict[str, Path], tmp_path: Path) -> None:
    mapping = {"model.layers.0.self_attn.o_proj.weight": "fp8", "model.layers.0.self_attn.o_proj": "fp16"}
    path = write_yaml(tmp_path / "s.yaml", {"mixed_precision": {
        "fp16_path": str(small_moe["bf16"]), "fp8_path": str(small_moe["fp8"]), "weight_mapping": mapping}})
    with pytest.raises(PlanError, match="module model.layers.0.self_attn.o_proj is mapped twice: fp8 and fp16"):
        build_plan(config.load(path))


def test_seed_form_naming_every_expert_plans_in_seconds(qwen3_30b: dict[str, Path], tmp_path: Path) -> None:
    # the seed documents' style at full scale: 48 layers x 128 experts x 3 projections by name
    names = [f"model.layers.{layer}.mlp.experts.{e}.{p}.weight" for layer in range(48)
             for e in range(128) for p in ("gate_proj", "up_proj", "down_proj")]
    path = write_yaml(tmp_path / "s.yaml", {"mixed_precision": {
        "fp16_path": str(qwen3_30b["bf16"]), "fp8_path": str(qwen3_30b["fp8"]),
        "gptq_int4_path": str(qwen3_30b["gptq"]), "weight_mapping": dict.fromkeys(names, "gptq_int4")}})
    t = time.perf_counter()
    plan = build_plan(config.load(path))
    assert time.perf_counter() - t < 15    # ~1 s on a quiet 2-core machine; was 7 minutes
    experts = [a for a in plan.assignments if a.module.kind == "experts"]
    assert len(experts) == 18432 and {a.source for a in experts} == {"gptq_int4"}
    assert not plan.warnings
