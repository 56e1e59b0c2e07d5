"""One rank of a TP / EP group on CPU (gloo), the way an SGLang scheduler process sets itself up,
loading a mix through the mixed loader. Run by test_parallel.py as
`python sgl_rank.py RANK WORLD PORT SPEC.json OUT.json` (one process per rank)."""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sgl_shims  # noqa: E402

sgl_shims.apply()


def run(rank: int, world: int, port: int, spec: dict) -> dict:
    from mixload.adapters.sglang import plugin

    plugin.register()   # as SGLang's load_plugins() does first thing in a scheduler process
    if spec.get("sglang_gptq_moe_params"):   # SGLang's own GPTQ-Marlin MoE shapes, unfixed
        import mixload.adapters.sglang.quant_config as qc
        qc._fix_gptq_moe_params = lambda method: None
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed.parallel_state import (init_distributed_environment,
                                                       initialize_model_parallel)
    from sglang.srt.layers.dp_attention import init_dp_gathered_buffer, initialize_dp_attention
    from sglang.srt.layers.moe import initialize_moe_config
    from sglang.srt.model_loader.loader import get_model_loader
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish
    from sglang.srt.server_args import ServerArgs

    from mixload.adapters.sglang.loader import (Settings, build_model, load_weights, local_experts,
                                                 tensor_parallel)
    from mixload.core.errors import AuditError
    from sgl_expected import rank_mismatches

    sa = ServerArgs(model_path=spec["model"], device="cpu", tp_size=world, ep_size=spec["ep"],
                    dtype="bfloat16", quantization="mixload", attention_backend="torch_native",
                    skip_tokenizer_init=True, disable_cuda_graph=True)
    publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=rank, dp_rank=None, gpu_id=rank))
    initialize_moe_config()
    init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel()   # widths from the published server args
    mc = ModelConfig(model_path=spec["model"], dtype="bfloat16", quantization="mixload")
    initialize_dp_attention(sa)
    init_dp_gathered_buffer(mc)

    lc = LoadConfig(model_loader_extra_config=Settings(spec["mix"]).to_extra())
    assert type(get_model_loader(lc, mc)).__name__ == "MixedModelLoader"
    model, plan = build_model(mc, lc, DeviceConfig("cpu"))
    try:
        record = load_weights(model, plan)
        problems = []
    except AuditError as exc:
        record, problems = None, [f"{p.what} [{p.tensor}]" for p in exc.problems]
    parallel = get_parallel()
    moe = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.experts"))
    experts = local_experts(moe)
    bad, unbacked, checked = rank_mismatches(
        model, plan, tensor_parallel()[1], world,
        getattr(parallel, "moe_tp_rank", 0), getattr(parallel, "moe_tp_size", 1), experts)
    return {"rank": rank, "layers": mc.hf_config.num_hidden_layers, "plan_tp_ep": [plan.tp, plan.ep], "audit": problems,
            "experts": experts, "bad": bad, "unbacked": unbacked, "checked": checked,
            "read": record.stats.tensors if record else None,
            "skipped": len(record.skipped) if record else None,
            "bytes_read": record.bytes_read if record else None,
            "moe_tp": [getattr(parallel, "moe_tp_rank", None), getattr(parallel, "moe_tp_size", None)]}


if __name__ == "__main__":
    rank, world, port = map(int, sys.argv[1:4])
    spec = json.loads(Path(sys.argv[4]).read_text())
    try:
        result = run(rank, world, port, spec)
    except Exception:   # noqa: BLE001 - reported to the test
        result = {"rank": rank, "error": traceback.format_exc()}
    Path(sys.argv[5]).write_text(json.dumps(result))
