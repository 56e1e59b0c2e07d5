"""`mixload analyze`: bytes per unit and format, the seed's proposals, measured error scores and
the least-error mix under a budget, exported as a YAML that plans unchanged."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixload.core import analyze, budget, config, header_only, scores, tiny_family
from mixload.core.errors import ConfigError
from mixload.core.formats import Fp8, Gptq
from mixload.core.plan import build_plan

from conftest import SMALL_MOE

GiB = 2**30


def mixload(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mixload.core.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def qwen3_inv(qwen3_30b: dict[str, Path]) -> analyze.Inventory:
    return analyze.inventory([str(qwen3_30b[k]) for k in ("bf16", "fp8", "gptq")])


def synthetic_scores(inv: analyze.Inventory) -> scores.Scores:
    """Attention hurts most when quantized, experts least; int4 hurts more than fp8."""
    per_bit = {"bf16": 0.0, "fp8": 1.0, "gptq": 10.0}
    weight = {"attention": 3.0, "experts": 1.0}
    return {(u.group, s): per_bit[s] * weight[u.kind] * (1 + u.layer / 100)
            for u in inv.units for s in inv.specs}


# ---- inventory and the seed's proposals (headers only) -----------------------------------------

def test_units_are_the_engines_fused_groups(qwen3_inv: analyze.Inventory) -> None:
    units = {u.group: u for u in qwen3_inv.units}
    assert len(units) == 48 * 3   # qkv, o_proj, experts per layer
    qkv = units["model.layers.0.self_attn.qkv_proj"]
    assert qkv.modules == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    experts = units["model.layers.0.mlp.experts"]
    assert len(experts.modules) == 128 * 3 and experts.params == 128 * 3 * 768 * 2048
    assert experts.options["gptq"].label == "gptq-int4-g128"
    assert qwen3_inv.base == "bf16"


def test_memory_of_every_proposal_is_the_plans_memory(qwen3_inv: analyze.Inventory) -> None:
    props = {p.name: p for p in analyze.proposals(qwen3_inv)}
    # one precision per kind, attention at least as precise as the experts: 6 of 9 pairs
    assert len(props) == 6 and "attention bf16 · experts gptq" in props
    assert "attention gptq · experts bf16" not in props
    for p in props.values():
        plan = analyze.plan_of(qwen3_inv, p.choice)
        assert qwen3_inv.memory(p.choice) == plan.memory()["total_bytes"]
    classic = analyze.plan_of(qwen3_inv, props["attention bf16 · experts gptq"].choice)
    assert {a.format.label() for a in classic.assignments if a.module.kind == "experts"} == {"gptq-int4-g128"}


def test_per_rank_memory_and_tp_rules_come_from_the_plan(qwen3_30b: dict[str, Path]) -> None:
    inv = analyze.inventory([str(qwen3_30b[k]) for k in ("bf16", "fp8", "gptq")], tp=4)
    experts = next(u for u in inv.units if u.kind == "experts")
    # 768 / 4 = 192 per rank cuts FP8's 128-blocks and GPTQ's 128-groups: only BF16 is left
    assert set(experts.feasible()) == {"bf16"}
    assert "multiple of 128" in " ".join(experts.options["fp8"].problems)
    choice = {u.group: ("gptq" if u.kind == "attention" else "bf16") for u in inv.units}
    plan = analyze.plan_of(inv, choice)
    assert inv.memory(choice) == plan.memory()["per_rank_bytes"]
    assert [p.name for p in analyze.proposals(inv)] == ["attention bf16 · experts bf16"]


def test_dense_models_get_mlp_units_and_proposals(tmp_path: Path) -> None:
    dense = {k: v for k, v in SMALL_MOE.items() if k not in ("num_experts", "num_experts_per_tok",
                                                             "moe_intermediate_size")}
    dense["architectures"] = ["Qwen3ForCausalLM"]
    family = header_only.write_family(tmp_path, dense, {"bf16": None, "fp8": Fp8(), "gptq": Gptq()})
    inv = analyze.inventory([str(family[k]) for k in ("gptq", "bf16", "fp8")])
    assert inv.base == "bf16"   # the unquantized source, wherever it is given
    assert [u.group.split(".", 3)[-1] for u in inv.units if u.layer == 0] == \
        ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    names = [p.name for p in analyze.proposals(inv)]
    assert "attention bf16 · mlp fp8" in names and len(names) == 6
    for p in analyze.proposals(inv):
        assert inv.memory(p.choice) == analyze.plan_of(inv, p.choice).memory()["total_bytes"]


# ---- the budget planner --------------------------------------------------------------------------

@pytest.mark.parametrize("budget_gib", [16, 20, 30, 45])
def test_budget_choice_fits_plans_unchanged_and_beats_the_seed(qwen3_inv: analyze.Inventory,
                                                               budget_gib: int) -> None:
    score = synthetic_scores(qwen3_inv)
    chosen = budget.choose(qwen3_inv, score, budget_gib * GiB)
    assert chosen.nbytes <= budget_gib * GiB
    # on_conflict: error in the exported YAML, so this also proves every group is in one source
    plan = analyze.plan_of(qwen3_inv, chosen.choice)
    assert plan.memory()["total_bytes"] == chosen.nbytes
    for p in analyze.proposals(qwen3_inv):
        if qwen3_inv.memory(p.choice) <= budget_gib * GiB:
            assert chosen.error <= scores.total(score, p.choice)


def test_frontier_goes_from_smallest_to_most_precise(qwen3_inv: analyze.Inventory) -> None:
    points = budget.frontier(qwen3_inv, synthetic_scores(qwen3_inv))
    assert points[0].choice == qwen3_inv.all_from("gptq") and points[-1].error == 0
    assert all(a.nbytes < b.nbytes and a.error > b.error for a, b in zip(points, points[1:]))
    # the first upgrade removes the most error per byte: attention (3x the error of experts at
    # a thirtieth of the bytes), of the worst layer (47), its smaller unit (o_proj, not qkv)
    first = [g for g, s in points[1].choice.items() if s != "gptq"]
    assert first == ["model.layers.47.self_attn.o_proj"]


def test_impossible_budget_names_the_smallest_possible(qwen3_inv: analyze.Inventory) -> None:
    smallest = qwen3_inv.memory(qwen3_inv.all_from("gptq"))
    with pytest.raises(ConfigError, match=f"the smallest possible is .*{smallest} bytes"):
        budget.choose(qwen3_inv, synthetic_scores(qwen3_inv), smallest - 1)
    assert budget.choose(qwen3_inv, synthetic_scores(qwen3_inv), smallest).nbytes == smallest


@pytest.mark.parametrize("text,n", [("20GiB", 20 * GiB), ("512MiB", 512 * 2**20), ("1.5e9", 1_500_000_000),
                                    ("30 GB", 30 * 10**9), ("4096", 4096)])
def test_parse_bytes(text: str, n: int) -> None:
    assert budget.parse_bytes(text) == n


@pytest.mark.parametrize("text", ["20 gigs", "-1GiB", "GiB", "0"])
def test_parse_bytes_refuses_nonsense(text: str) -> None:
    with pytest.raises(ConfigError, match="can't read the budget"):
        budget.parse_bytes(text)


def test_exported_yaml_is_a_rule_form_config(qwen3_inv: analyze.Inventory, tmp_path: Path) -> None:
    chosen = budget.choose(qwen3_inv, synthetic_scores(qwen3_inv), 20 * GiB)
    path = analyze.write_yaml(tmp_path / "mix.yaml", analyze.mix_config(qwen3_inv, chosen.choice))
    data = yaml.safe_load(path.read_text())
    assert data["base"] == "bf16" and data["on_conflict"] == "error" and len(data["rules"]) < 10
    plan = build_plan(config.load(path))
    assert {a.module.group: a.source for a in plan.assignments if a.module.linear} == chosen.choice
    assert [p.name for p in tmp_path.iterdir()] == ["mix.yaml"]   # no temp file left


# ---- the command ---------------------------------------------------------------------------------

def test_cli_inventory_and_proposals(small_moe: dict[str, Path]) -> None:
    r = mixload("analyze", small_moe["bf16"], small_moe["fp8"], small_moe["gptq"])
    assert r.returncode == 0, r.stderr
    assert "Modules per kind and layer" in r.stdout and "gptq-int4-g128" in r.stdout
    assert "attention bf16 · experts gptq" in r.stdout


def test_cli_budget_export_plot(small_moe: dict[str, Path], tmp_path: Path) -> None:
    out, png = tmp_path / "mix.yaml", tmp_path / "frontier.png"
    r = mixload("analyze", *small_moe.values(), "--budget", "2MiB", "--tp", "2",
                "--export", out, "--plot", png)
    assert r.returncode == 0, r.stderr
    assert "planned OK" in r.stdout and png.read_bytes()[:4] == b"\x89PNG"
    r = mixload("plan", out, "--tp", "2")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,message", [
    (["--budget", "1KiB"], "the smallest possible is"),
    (["--budget", "20 gigs"], "can't read the budget"),
    (["--export", "x.yaml"], "--export and --plot need --budget"),
])
def test_cli_errors_exit_2(small_moe: dict[str, Path], args: list[str], message: str) -> None:
    r = mixload("analyze", *small_moe.values(), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_budget_without_an_unquantized_source_says_so(small_moe: dict[str, Path]) -> None:
    r = mixload("analyze", small_moe["fp8"], small_moe["gptq"], "--budget", "1GiB")
    assert r.returncode == 2 and "needs an unquantized" in r.stderr


# ---- measured scores on the tiny family ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_inv(tiny_cache: Path) -> analyze.Inventory:
    folders = [tiny_family.resolve(s, tiny_cache)
               for s in ("qwen3-moe", "qwen3-moe/fp8", "qwen3-moe/gptq-int4")]
    return analyze.inventory([str(f) for f in folders])


def test_measured_scores_order_the_formats(tiny_inv: analyze.Inventory, tiny_cache: Path) -> None:
    for calib in (None, tiny_family.corpus()[0][:20000]):
        score = scores.scores(tiny_inv, calib, cache_dir=tiny_cache)
        for u in tiny_inv.units:
            assert score[(u.group, "bf16")] == 0
            assert 0 < score[(u.group, "fp8")] < score[(u.group, "gptq")] < 0.1, u.group


def test_second_run_reads_no_tensor(tiny_inv: analyze.Inventory, tiny_cache: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calib = tiny_family.corpus()[0][:20000]
    first = scores.scores(tiny_inv, calib, cache_dir=tiny_cache)

    def fail(*args: object) -> None:
        raise AssertionError("the cache should have answered")
    monkeypatch.setattr(scores, "_unit_weights", fail)
    monkeypatch.setattr(scores, "capture", fail)
    assert scores.scores(tiny_inv, calib, cache_dir=tiny_cache) == first
    # another calibration text is another key
    with pytest.raises(AssertionError, match="cache should have answered"):
        scores.scores(tiny_inv, calib[:10000], cache_dir=tiny_cache)
