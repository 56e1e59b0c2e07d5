"""The launcher: the seed's flags in, the ServerArgs SGLang would get out (no server starts)."""
from __future__ import annotations

import json

import pytest
from sgl_fixtures import write_mix
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.model_loader.loader import get_model_loader

from mixload.adapters.sglang import launch
from mixload.core.errors import MixloadError, PlanError

SEED_FLAGS = ["--tp-size", "4", "--dp-size", "2", "--host", "0.0.0.0", "--port", "30000",
              "--max-running-requests", "64", "--max-total-tokens", "16384", "--dtype", "bfloat16"]


@pytest.fixture
def two_bf16(family, tmp_path):
    """A mix of two BF16 checkpoints (fits TP=4 on the tiny model)."""
    moe = family["qwen3-moe"]
    return write_mix(tmp_path / "mix.yaml", {"a": moe["bf16"], "b": moe["bf16b"]}, "a",
                     [("*.mlp.experts.*", "b")])


def test_seed_command_line_becomes_sglang_server_args(two_bf16, family):
    l = launch.build(["--enable-mixed-precision", "--mixed-precision-config", str(two_bf16),
                      "--model-path", str(family["qwen3-moe"]["bf16"]), *SEED_FLAGS])
    sa = l.server_args
    assert (sa.tp_size, sa.dp_size, sa.host, sa.port) == (4, 2, "0.0.0.0", 30000)
    assert (sa.max_running_requests, sa.max_total_tokens, sa.dtype) == (64, 16384, "bfloat16")
    assert sa.model_path == str(family["qwen3-moe"]["bf16"])
    assert sa.quantization == "mixload"
    extra = json.loads(sa.model_loader_extra_config)["mixload"]
    assert extra == {"config": str(two_bf16.resolve()), "fingerprint": l.plan.fingerprint,
                     "report_dir": l.settings.report_dir}
    assert (l.plan.tp, l.plan.ep) == (4, 1)             # planned for SGLang's own TP/EP


def test_model_path_defaults_to_the_base_source_and_user_extra_config_is_kept(two_bf16, family):
    l = launch.build(["--enable-mixed-precision", "--mixed-precision-config", str(two_bf16),
                      "--model-loader-extra-config", '{"enable_multithread_load": true}'])
    assert l.server_args.model_path == str(family["qwen3-moe"]["bf16"])
    extra = json.loads(l.server_args.model_loader_extra_config)
    assert extra["enable_multithread_load"] is True and "mixload" in extra


def test_without_enable_mixed_precision_it_is_plain_sglang(family):
    l = launch.build(["--model-path", str(family["qwen3-moe"]["fp8"]), *SEED_FLAGS])
    assert l.plan is None and l.server_args.quantization is None
    assert l.argv == ["--model-path", str(family["qwen3-moe"]["fp8"]), *SEED_FLAGS]


@pytest.mark.parametrize("argv, message", [
    (["--mixed-precision-config", "x.yaml"], "without --enable-mixed-precision"),
    (["--enable-mixed-precision"], "needs --mixed-precision-config"),
])
def test_seed_flags_must_come_together(argv, message):
    with pytest.raises(MixloadError, match=message):
        launch.build(argv)


def test_a_plan_that_does_not_fit_the_tp_size_fails_before_sglang_starts(family, tmp_path, capsys):
    moe = family["qwen3-moe"]
    mix = write_mix(tmp_path / "mix.yaml", {"fp8": moe["fp8"]}, "fp8", [])
    with pytest.raises(PlanError, match="FP8 block 128: output per rank 256/4=64"):
        launch.build(["--enable-mixed-precision", "--mixed-precision-config", str(mix), *SEED_FLAGS])
    # main() prints every problem and exits 2, like `mixload check`
    assert launch.main(["--enable-mixed-precision", "--mixed-precision-config", str(mix),
                        *SEED_FLAGS]) == 2
    assert "problem" in capsys.readouterr().err


def test_another_quantization_or_another_model_is_refused(two_bf16, family):
    with pytest.raises(MixloadError, match="--quantization fp8 conflicts"):
        launch.build(["--enable-mixed-precision", "--mixed-precision-config", str(two_bf16),
                      "--quantization", "fp8"])
    with pytest.raises(MixloadError, match="not the model of the mix: architectures, num_experts"):
        dense = family["qwen3"]["bf16"]
        launch.build(["--enable-mixed-precision", "--mixed-precision-config", str(two_bf16),
                      "--model-path", str(dense)])


def test_mixload_endpoint_shows_the_plan_and_what_each_rank_loaded(two_bf16, model_config, tmp_path):
    """What a worker writes after its audit is what GET /mixload returns."""
    l = launch.build(["--enable-mixed-precision", "--mixed-precision-config", str(two_bf16),
                      "--mixload-report-dir", str(tmp_path / "reports")])
    assert launch.mixload_info(l)["ranks"] == [] and not launch.mixload_info(l)["loaded"]

    mc = model_config(l.server_args.model_path)           # the scheduler's side, TP=1
    lc = LoadConfig(model_loader_extra_config=json.loads(l.server_args.model_loader_extra_config))
    get_model_loader(lc, mc).load_model(model_config=mc, device_config=DeviceConfig("cpu"))

    info = launch.mixload_info(l)
    assert info["loaded"] and info["plan"]["fingerprint"] == l.plan.fingerprint
    (rank,) = info["ranks"]
    assert rank["measured_rank_bytes"] == rank["planned_rank_bytes"]
    assert rank["bytes_read"] == sum(a.nbytes for a in l.plan.assignments)


def test_adapter_hooks_name_the_backend_and_serve_only_sglang():
    from mixload.adapters.sglang import plugin
    from mixload.core.hooks import AdapterSpec, PROJECT
    import pluggy

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(AdapterSpec)
    pm.register(plugin)
    assert pm.hook.mixload_backend() == ["sglang"]
    assert pm.hook.mixload_serve(backend="vllm", argv=[]) is None
    # `mixload serve sglang <bad flags>` goes through the launcher: exit 2, no server
    assert pm.hook.mixload_serve(backend="sglang", argv=["--enable-mixed-precision"]) == 2
