"""Loading a mixed model into SGLang's own Qwen3-MoE and Qwen3 classes (CPU), from several
published-style checkpoints: what each layer runs, and every parameter bit for bit.

The pattern of every test is what SGLang's scheduler does with `--quantization mixload`:
    loader = get_model_loader(load_config, model_config)   -> the mixload loader
    model  = loader.load_model(...)                         -> build, stream, audit, post-process
On CPU the Marlin/FP8 kernels can't run, so the int4 tests stop before post-processing:
build_model -> load_weights (stream + audit), the two steps load_model runs first.
"""
from __future__ import annotations

import json

import pytest
from sgl_fixtures import bf16_checkpoint, write_mix
from sgl_expected import mismatches
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.model_loader.loader import get_model_loader

from mixload.adapters.sglang.loader import Settings, build_model, load_weights
from mixload.core.errors import AuditError, MixloadError
from mixload.core.formats import Unquantized

CPU = DeviceConfig("cpu")

METHOD = {  # what SGLang itself runs for a checkpoint of each format
    ("bf16", "linear"): "UnquantizedLinearMethod", ("bf16", "moe"): "UnquantizedFusedMoEMethod",
    ("fp8", "linear"): "Fp8LinearMethod", ("fp8", "moe"): "Fp8MoEMethod",
    ("gptq", "linear"): "GPTQMarlinLinearMethod", ("gptq", "moe"): "GPTQMarlinMoEMethod",
    ("awq", "linear"): "AWQLinearMethod", ("awq", "moe"): "AWQMoEMethod",
}


@pytest.fixture
def mixed(family, model_config, tmp_path):
    """mixed(arch, base, rules) -> (model_config, load_config, model, plan), built by SGLang
    with the mixload quant config; weights not loaded yet."""
    def build(arch: str, base: str, rules: list[tuple[str, str]], **extra):
        sources = {k: family[arch][k] for k in {base, *(u for _, u in rules)}}
        mix = write_mix(tmp_path / "mix.yaml", sources, base, rules, **extra)
        mc = model_config(sources[base])
        lc = LoadConfig(model_loader_extra_config=Settings(str(mix)).to_extra())
        model, plan = build_model(mc, lc, CPU)
        return mc, lc, model, plan
    return build


def methods(model) -> dict[str, str]:
    """Quant method class per layer, layer 0 and the top level (`layers.0.` -> `layers.N.`)."""
    return {name: type(m.quant_method).__name__ for name, m in model.named_modules()
            if getattr(m, "quant_method", None) is not None and ".1." not in name}


@pytest.mark.parametrize("int4", ["gptq", "awq"])
def test_classic_moe_mix_bf16_attention_fp8_base_int4_experts(mixed, int4):
    mc, lc, model, plan = mixed("qwen3-moe", "fp8", [("*.mlp.experts.*", int4), ("*.self_attn.*", "bf16")])
    assert type(get_model_loader(lc, mc)).__name__ == "MixedModelLoader"
    assert methods(model) == {
        "model.embed_tokens": "UnquantizedEmbeddingMethod",
        "model.layers.0.self_attn.qkv_proj": METHOD["bf16", "linear"],
        "model.layers.0.self_attn.o_proj": METHOD["bf16", "linear"],
        "model.layers.0.mlp.experts": METHOD[int4, "moe"],
        "model.layers.0.mlp.gate": METHOD["bf16", "linear"],            # router stays unquantized
        "lm_head": "UnquantizedEmbeddingMethod"}

    record = load_weights(model, plan)                                  # the audit passes

    bad, unbacked, checked = mismatches(model, plan)
    assert not bad and checked > 20
    # The only parameters no checkpoint tensor backs are Marlin's runtime permutations.
    assert {n.rsplit(".", 1)[1] for n in unbacked} <= {"w13_g_idx_sort_indices",
                                                       "w2_g_idx_sort_indices"}
    # Exactly the planned tensors were read, each once, nothing else; each file opened once.
    planned = [t for a in plan.assignments for t in a.tensors.values()]
    assert record.stats.tensors == len(planned)
    assert record.stats.bytes_read == sum(t.nbytes for t in planned)
    assert record.stats.files_opened == len({t.file for t in planned})


@pytest.mark.parametrize("attention, mlp", [("fp8", "gptq"), ("gptq", "awq"), ("awq", "fp8"),
                                            ("bf16", "fp8")])
def test_dense_qwen3_every_format_on_attention_and_mlp(mixed, attention, mlp):
    _, _, model, plan = mixed("qwen3", "bf16", [("re:model\\.layers\\.1\\.mlp\\..*", "bf16"),
                                                 ("*.self_attn.*", attention), ("*.mlp.*", mlp)])
    m = methods(model) | {k: type(v.quant_method).__name__ for k, v in model.named_modules()
                          if k == "model.layers.1.mlp.gate_up_proj"}
    assert m["model.layers.0.self_attn.qkv_proj"] == METHOD[attention, "linear"]
    assert m["model.layers.0.self_attn.o_proj"] == METHOD[attention, "linear"]
    assert m["model.layers.0.mlp.gate_up_proj"] == METHOD[mlp, "linear"]
    assert m["model.layers.0.mlp.down_proj"] == METHOD[mlp, "linear"]
    assert m["model.layers.1.mlp.gate_up_proj"] == METHOD["bf16", "linear"]

    load_weights(model, plan)
    bad, unbacked, checked = mismatches(model, plan)
    assert not bad and not unbacked and checked == len(dict(model.named_parameters()))


def test_moe_experts_fp8_attention_gptq_bit_for_bit(mixed):
    _, _, model, plan = mixed("qwen3-moe", "bf16", [("*.mlp.experts.*", "fp8"),
                                                     ("*.self_attn.*", "gptq")])
    assert methods(model)["model.layers.0.mlp.experts"] == "Fp8MoEMethod"
    assert methods(model)["model.layers.0.self_attn.qkv_proj"] == "GPTQMarlinLinearMethod"
    load_weights(model, plan)
    bad, unbacked, _ = mismatches(model, plan)
    assert not bad and not unbacked


def test_full_load_model_runs_sglang_post_processing_and_reports_memory(mixed, tmp_path):
    """bf16 attention + fp8 everything else: load_model end to end (FP8 post-processing runs on
    CPU), the report lands in the report folder with planned vs measured bytes by precision."""
    mc, lc, _, plan = mixed("qwen3-moe", "fp8", [("*.self_attn.*", "bf16")])
    extra = Settings(lc.model_loader_extra_config["mixload"]["config"],
                     fingerprint=plan.fingerprint, report_dir=str(tmp_path / "reports"))
    lc = LoadConfig(model_loader_extra_config=extra.to_extra())
    loader = get_model_loader(lc, mc)
    model = loader.load_model(model_config=mc, device_config=CPU)

    assert not model.training
    assert methods(model)["model.layers.0.mlp.experts"] == "Fp8MoEMethod"
    report = json.loads((tmp_path / "reports" / "rank-0-dp-0.json").read_text())
    assert report == loader.report and report["fingerprint"] == plan.fingerprint
    planned, measured = report["planned_rank_bytes"], report["measured_rank_bytes"]
    assert set(planned) == {"bf16", "fp8"}
    # FP8 post-processing keeps the e4m3 weights and their scales: same bytes as planned.
    assert measured["fp8"] == planned["fp8"]
    assert measured["bf16"] == planned["bf16"]


def test_fingerprint_mismatch_between_launcher_and_worker_is_refused(mixed, tmp_path):
    from mixload.core.errors import MixloadError

    mc, lc, _, plan = mixed("qwen3-moe", "fp8", [])
    path = lc.model_loader_extra_config["mixload"]["config"]
    lc = LoadConfig(model_loader_extra_config=Settings(path, fingerprint="0" * 16).to_extra())
    with pytest.raises(MixloadError, match="the launcher planned 0000000000000000"):
        get_model_loader(lc, mc).load_model(model_config=mc, device_config=CPU)


def test_seed_yaml_verbatim_splits_a_moe_layer_and_is_promoted(family, model_config, tmp_path):
    """The seed document's own YAML: expert 0 of layer 0 in GPTQ-int4, its gate_proj in FP8,
    qkv_proj in fp16. One MoE layer runs one method, so the group is promoted to the most
    precise member (warned in the plan), and SGLang runs exactly that."""
    moe = family["qwen3-moe"]
    seed = tmp_path / "seed.yaml"
    seed.write_text(f"""
mixed_precision:
  fp16_path: "{moe['bf16']}"
  fp8_path: "{moe['fp8']}"
  gptq_int4_path: "{moe['gptq']}"
  base_model_path: "{moe['fp8']}"
  weight_mapping:
    "model.layers.0.mlp.experts.0.down_proj.weight": "gptq_int4"
    "model.layers.0.mlp.experts.0.gate_proj.weight": "fp8"
    "model.layers.0.self_attn.qkv_proj.weight": "fp16"
""")
    mc = model_config(moe["fp8"])
    lc = LoadConfig(model_loader_extra_config=Settings(str(seed)).to_extra())
    model, plan = build_model(mc, lc, CPU)
    assert any("model.layers.0.mlp.experts" in w for w in plan.warnings)
    m = methods(model)
    assert m["model.layers.0.self_attn.qkv_proj"] == "UnquantizedLinearMethod"
    assert m["model.layers.0.mlp.experts"] == "Fp8MoEMethod"
    load_weights(model, plan)
    assert not mismatches(model, plan)[0]


# ---- the audit is the guarantee: SGLang would load each of these silently

def audit_problems(model, plan) -> list[tuple[str, str]]:
    """(what, tensor) of every problem the load's audit raises."""
    with pytest.raises(AuditError) as err:
        load_weights(model, plan)
    return [(p.what, p.tensor) for p in err.value.problems]


def test_audit_catches_a_parameter_the_plan_never_fills(mixed):
    _, _, model, plan = mixed("qwen3-moe", "fp8", [])
    up = plan.by_name()["model.layers.1.mlp.experts.5.up_proj"]
    del up.tensors["weight_scale_inv"]          # a broken plan: one expert's scale missing
    (what, tensor), = audit_problems(model, plan)
    assert what.startswith("parameter model.layers.1.mlp.experts.w13_weight_scale_inv was not "
                           "filled: 6% of it was never written")   # 1 of 8 experts x 2 shards
    assert tensor == "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv"


def test_audit_catches_a_tensor_sglang_ignores(mixed, family):
    from mixload.core.sources import open_source

    _, _, model, plan = mixed("qwen3-moe", "bf16", [])
    fp8 = open_source("fp8", family["qwen3-moe"]["fp8"])
    q = plan.by_name()["model.layers.0.self_attn.q_proj"]
    # A bf16 module that also streams an FP8 scale: Qwen3's load_weights drops the unknown name.
    name = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    q.tensors["weight_scale_inv"] = fp8.tensors[name]
    (what, tensor), = audit_problems(model, plan)
    assert what.startswith("planned tensor was not written into any parameter of layer "
                           "model.layers.0.self_attn.qkv_proj") and tensor == name


def test_audit_catches_layers_whose_method_is_not_the_planned_one(mixed):
    """A model built for one plan, audited against another (fp8 experts vs gptq experts):
    refused before a byte is read."""
    mc, _, model, _ = mixed("qwen3-moe", "fp8", [])
    _, _, _, other = mixed("qwen3-moe", "fp8", [("*.mlp.experts.*", "gptq")])
    assert audit_problems(model, other) == [
        ("layer runs fp8, but the plan says gptq-int4-g128 from source 'gptq'",
         f"model.layers.{i}.mlp.experts") for i in range(mc.hf_config.num_hidden_layers)]


def test_unquantized_everywhere_the_plan_says_so(mixed):
    _, _, model, plan = mixed("qwen3-moe", "bf16", [])
    assert all(isinstance(a.format, Unquantized) for a in plan.assignments)
    assert set(methods(model).values()) == {"UnquantizedEmbeddingMethod", "UnquantizedLinearMethod",
                                            "UnquantizedFusedMoEMethod"}
    load_weights(model, plan)
    assert not mismatches(model, plan)[0]


def test_a_mixload_build_folder_is_served_without_any_flag(family, model_config, tmp_path):
    """`mixload build mix.yaml -o DIR; sglang serve --model-path DIR`: config.json says
    quant_method mixload, SGLang picks the method and the loader from it, nothing else given."""
    from mixload.core.build import build

    moe = family["qwen3-moe"]
    mix = write_mix(tmp_path / "mix.yaml", {"fp8": moe["fp8"], "bf16": moe["bf16"]}, "fp8",
                    [("*.self_attn.*", "bf16")])
    folder = build(mix, tmp_path / "built")
    mc = model_config(folder, quantization=None)
    assert mc.quantization == "mixload"                    # detected from config.json
    loader = get_model_loader(LoadConfig(), mc)
    model = loader.load_model(model_config=mc, device_config=CPU)
    assert loader.plan.fingerprint == json.loads((folder / "config.json").read_text())[
        "quantization_config"]["fingerprint"]
    assert methods(model)["model.layers.0.mlp.experts"] == "Fp8MoEMethod"
    assert methods(model)["model.layers.0.self_attn.qkv_proj"] == "UnquantizedLinearMethod"


def test_a_dense_layer_sglang_would_build_as_experts_is_refused_before_loading(model_config,
                                                                               tmp_path):
    """SGLang's Qwen3-MoE ignores mlp_only_layers: for a checkpoint whose layer 0 is dense it
    builds experts there, which its own loader would leave uninitialized. mixload refuses to
    build it, naming the layer, what config.json says is there, and what to do."""
    bf16 = bf16_checkpoint(tmp_path, "qwen3-hybrid")
    mix = write_mix(tmp_path / "mix.yaml", {"bf16": bf16}, "bf16", [])
    lc = LoadConfig(model_loader_extra_config=Settings(str(mix)).to_extra())
    with pytest.raises(MixloadError, match=r"'model\.layers\.0\.mlp\.experts' where config\.json "
                                           r"describes model\.layers\.0\.mlp\.down_proj") as err:
        build_model(model_config(bf16), lc, CPU)
    assert "mlp_only_layers" in str(err.value) and "vLLM" in err.value.fix
