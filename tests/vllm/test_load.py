"""Loading a plan into vLLM's own model (no engine, no kernel runs: any CPU): every parameter
holds exactly the planned tensors' bits, the audit passes, and it fails loudly, naming layer and
tensor, when the plan and the engine disagree."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import vllm_support as vs
from safetensors.torch import load_file, save_file

from mixload.adapters.vllm.compat import is_engine_initialized
from mixload.adapters.vllm.loader import layer_params, load_planned
from mixload.core.build import build
from mixload.core.errors import AuditError, MixloadError
from mixload.core.plan import Plan

AMX = torch.cpu._is_amx_tile_supported()
needs_amx = pytest.mark.skipif(not AMX, reason="vLLM's CPU FP8-block and int4 MoE kernels need "
                                               "AMX; vLLM picks them when it builds the layer")


def mixed_model(tmp_path: Path, mix: dict) -> tuple[torch.nn.Module, Plan]:
    """Build the mix's folder and vLLM's model for it; returns the model and its plan."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    folder = build(vs.write_mix(tmp_path / "mix.yaml", mix), tmp_path / "model")
    config = vs.engine_config(folder)
    return vs.fresh_model(config), config.quant_config.plan


def assert_bit_exact(model: torch.nn.Module, plan: Plan) -> None:
    """Each parameter equals its planned tensors, fused / stacked as the layer fuses them.
    Integer and FP8 tensors keep their bits and dtype; float weights and scales are cast to the
    model dtype, as vLLM casts every float checkpoint tensor."""
    for name, p in layer_params(model).items():
        if is_engine_initialized(name):   # no checkpoint tensor fills it (int4 MoE's zero bias)
            continue
        want = vs.expected_param(plan, name, p.shape)
        if want.dtype.is_floating_point and want.element_size() > 1:
            assert torch.equal(p, want.to(p.dtype)), name
        else:
            assert p.dtype == want.dtype and torch.equal(p.view(torch.uint8),
                                                         want.view(torch.uint8)), name


DENSE_INT4 = [{"match": "model.layers.0.self_attn.*", "use": "gptq"},
              {"match": "model.layers.0.mlp.*", "use": "awq"},
              {"match": "model.layers.1.self_attn.*", "use": "awq"},
              {"match": "model.layers.1.mlp.down_proj", "use": "gptq"}]


def dense_mix(dense: dict[str, Path], rules: list[dict]) -> dict:
    return {"sources": {k: str(dense[k]) for k in ("bf16", "gptq", "awq", "fp8")},
            "base": "bf16", "rules": rules}


def test_dense_bf16_gptq_awq_per_layer(dense: dict[str, Path], tmp_path: Path) -> None:
    model, plan = mixed_model(tmp_path, dense_mix(dense, DENSE_INT4))
    report = load_planned(model, plan)
    assert_bit_exact(model, plan)
    vs.assert_report(report, plan)
    assert report.redundant_bytes == 4 * (256 + 256 + 256 + 512 + 512)   # g_idx of 5 GPTQ modules


def test_moe_bf16_experts_int4_attention(moe: dict[str, Path], tmp_path: Path) -> None:
    model, plan = mixed_model(tmp_path, {
        "sources": {k: str(moe[k]) for k in ("bf16", "gptq", "awq")}, "base": "bf16",
        "rules": [{"match": "model.layers.0.self_attn.*", "use": "gptq"},
                  {"match": "model.layers.1.self_attn.*", "use": "awq"}]})
    report = load_planned(model, plan)
    assert_bit_exact(model, plan)
    vs.assert_report(report, plan)


def test_int4_dense_mlp_of_a_moe_model(hybrid: dict[str, Path], tmp_path: Path) -> None:
    """The demo's mix on a CPU without AMX: BF16 attention and experts, a GPTQ dense MLP in
    layer 0 (vLLM's Qwen3-MoE fuses its gate_up_proj only when mlp_only_layers is set)."""
    model, plan = mixed_model(tmp_path, {
        "sources": {k: str(hybrid[k]) for k in ("bf16", "gptq")}, "base": "bf16",
        "rules": [{"match": "model.layers.0.mlp.*", "use": "gptq"}]})
    report = load_planned(model, plan)
    assert_bit_exact(model, plan)
    vs.assert_report(report, plan)
    assert type(model.model.layers[0].mlp.gate_up_proj.quant_method).__name__ == \
        "AutoGPTQLinearMethod"


@needs_amx
def test_fp8_and_int4_experts(moe: dict[str, Path], tmp_path: Path) -> None:
    model, plan = mixed_model(tmp_path, {
        "sources": {k: str(moe[k]) for k in ("bf16", "gptq", "awq", "fp8")}, "base": "bf16",
        "rules": [{"match": "model.layers.0.mlp.experts.*", "use": "gptq"},
                  {"match": "model.layers.1.mlp.experts.*", "use": "awq"},
                  {"match": "*.self_attn.*", "use": "fp8"}]})
    report = load_planned(model, plan)
    assert_bit_exact(model, plan)
    vs.assert_report(report, plan)


@pytest.mark.skipif(AMX, reason="checks the refusal on a CPU without AMX")
def test_int4_experts_without_a_kernel_are_refused_by_layer(moe: dict[str, Path],
                                                            tmp_path: Path) -> None:
    folder = build(vs.write_mix(tmp_path / "mix.yaml", {
        "sources": {"bf16": str(moe["bf16"]), "gptq": str(moe["gptq"])}, "base": "bf16",
        "rules": [{"match": "model.layers.0.mlp.experts.*", "use": "gptq"}]}), tmp_path / "m")
    with pytest.raises(MixloadError, match="vLLM can't run this layer as gptq-int4-g128") as exc:
        vs.fresh_model(vs.engine_config(folder))
    assert exc.value.tensor == "model.layers.0.mlp.experts"


def without(plan: Plan, module: str, suffix: str) -> Plan:
    """The plan with one planned tensor removed, as a buggy planner might leave it."""
    rows = [dataclasses.replace(a, tensors={s: t for s, t in a.tensors.items() if s != suffix})
            if a.module.name == module else a for a in plan.assignments]
    return dataclasses.replace(plan, assignments=rows)


def test_audit_names_a_tensor_missing_from_the_plan(dense: dict[str, Path],
                                                    tmp_path: Path) -> None:
    model, plan = mixed_model(tmp_path, dense_mix(dense, DENSE_INT4))
    with pytest.raises(AuditError) as exc:
        load_planned(model, without(plan, "model.layers.0.self_attn.k_proj", "scales"))
    message = str(exc.value)
    assert "parameter model.layers.0.self_attn.qkv_proj.scales was not filled: 25% of it" in message
    assert "the plan has no model.layers.0.self_attn.k_proj.scales" in message
    assert len(exc.value.problems) == 1


def test_audit_names_a_layer_left_unquantized(dense: dict[str, Path], tmp_path: Path) -> None:
    # vLLM built layer 1's MLP in BF16 (the first plan) but the plan being loaded says GPTQ.
    model, _ = mixed_model(tmp_path / "a", dense_mix(dense, DENSE_INT4[:3]))
    _, plan = mixed_model(tmp_path / "b", dense_mix(dense, DENSE_INT4[:3] + [
        {"match": "model.layers.1.mlp.*", "use": "gptq"}]))
    with pytest.raises(AuditError) as exc:
        load_planned(model, plan)
    problems = {p.tensor: p.what for p in exc.value.problems}
    assert problems == {
        "model.layers.1.mlp.gate_up_proj": "layer runs unquantized, but the plan says "
                                           "gptq-int4-g128 from source 'gptq'",
        "model.layers.1.mlp.down_proj": "layer runs unquantized, but the plan says "
                                        "gptq-int4-g128 from source 'gptq'"}


def test_audit_names_a_tensor_the_engine_dropped(dense: dict[str, Path], tmp_path: Path) -> None:
    # A checkpoint with a q_proj bias the model has no place for (Qwen3: attention_bias false):
    # vLLM skips unexpected biases without a word; a non-zero one changes the model.
    src = tmp_path / "with-bias"
    src.mkdir()
    for f in dense["bf16"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.full((512,), 0.5, dtype=torch.bfloat16)
    save_file(tensors, src / "model.safetensors")
    model, plan = mixed_model(tmp_path, {"sources": {"bf16": str(src)}})
    with pytest.raises(AuditError) as exc:
        load_planned(model, plan)
    (problem,) = exc.value.problems
    assert problem.tensor == "model.layers.0.self_attn.q_proj.bias"
    assert re.match(r"planned tensor was not written into any parameter of layer "
                    r"model\.layers\.0\.self_attn\.qkv_proj", problem.what)


def test_a_source_changed_since_build_is_refused(dense: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in dense["bf16"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    folder = build(vs.write_mix(tmp_path / "mix.yaml", {"sources": {"bf16": str(src)}}),
                   tmp_path / "model")
    tensors = load_file(src / "model.safetensors")   # re-exported in F16: new dtypes, offsets
    save_file({k: v.half() for k, v in tensors.items()}, src / "model.safetensors")
    with pytest.raises(MixloadError, match="a source checkpoint changed since `mixload build`"):
        vs.engine_config(folder)


@pytest.mark.parametrize("locked", [False, True])
def test_a_checkpoint_rewritten_after_the_build_is_refused(dense: dict[str, Path], tmp_path: Path,
                                                           locked: bool) -> None:
    """Same layout, other bytes (a re-conversion in place): the fingerprint can't tell, the
    loader's content check does, before vLLM gets a weight. With --lock even when the file's
    mtime is put back."""
    from mixload.adapters.vllm.loader import MixedModelLoader

    src = tmp_path / "b"
    shutil.copytree(dense["bf16-b"], src)
    folder = build(vs.write_mix(tmp_path / "mix.yaml", {
        "sources": {"a": str(dense["bf16"]), "b": str(src)}, "base": "a",
        "rules": [{"match": "model.layers.1.*", "use": "b"}]}), tmp_path / "model", lock=locked)
    shard = src / "model.safetensors"
    stamp = shard.stat()
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.down_proj.weight"] *= -1
    save_file(tensors, shard, metadata={"format": "pt"})
    if locked:
        os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))

    config = vs.engine_config(folder)
    with vs.engine_context(config), pytest.raises(MixloadError) as exc:
        MixedModelLoader(config.load_config).load_model(config, config.model_config)
    assert str(shard) in str(exc.value)
    if locked:
        assert "model.layers.1.mlp.down_proj.weight" in str(exc.value)
