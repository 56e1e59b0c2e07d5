"""The SGLang model loader for a mixload plan: build the model with the plan's quant config, feed
it exactly the planned tensors, and prove it took them.

SGLang's `model.load_weights` silently skips names it does not know and leaves parameters it was
never given uninitialized (torch.empty). So the load ends in mixload's engine-neutral audit
(core/audit.py): parameters are armed with a sentinel before loading, a dispatch mode records
which streamed tensor reached which parameter (core/stream.py), and afterwards every planned
tensor must have been consumed, every parameter filled (all of it: a fused q/k/v with one shard
missing, or an expert left out, still shows the sentinel), and every layer must run its planned
format. A load that fails raises AuditError; nothing half-loaded is served.

SGLang picks this loader when the model's quantization is `mixload` (the plugin wraps
`get_model_loader`); the plan's YAML comes from `--model-loader-extra-config
'{"mixload": {"config": "mix.yaml", ...}}'` (written by the launcher) or from a `mixload build`
folder's `quantization_config: {quant_method: mixload, mix: mix.yaml, fingerprint: ...}`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixload.core import audit, lock
from mixload.core.config import load as load_mix
from mixload.core.device_memory import DeviceMemory
from mixload.core.errors import AuditError, MixloadError
from mixload.core.plan import Plan, build_plan
from mixload.core.stream import Consumption, ReadStats, local_plan, stream

logger = logging.getLogger(__name__)

EXTRA_KEY = "mixload"   # key in --model-loader-extra-config
ENV_REPORT_DIR = "MIXLOAD_REPORT_DIR"


# ---- where the plan comes from

@dataclass(frozen=True)
class Settings:
    """What a worker needs to rebuild the launcher's plan."""

    config: str                      # the mix YAML (absolute)
    fingerprint: str | None = None   # the plan the launcher printed; a worker must match it
    report_dir: str | None = None    # where each rank writes its load report (JSON)

    def to_extra(self) -> dict[str, Any]:
        return {EXTRA_KEY: {k: v for k, v in self.__dict__.items() if v is not None}}


def settings_from_extra(extra: dict[str, Any] | None) -> Settings | None:
    raw = (extra or {}).get(EXTRA_KEY)
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"config": raw}
    return Settings(config=str(raw["config"]), fingerprint=raw.get("fingerprint"),
                    report_dir=raw.get("report_dir"))


def settings_from_quant_config(qc: dict[str, Any], folder: str | None = None) -> Settings:
    """From a config.json `quantization_config: {quant_method: mixload, config: ..}`; a relative
    path is relative to the model folder (a `mixload build` folder carries its YAML)."""
    path = qc.get("mix") or qc.get("config")   # `mixload build` writes "mix": "mix.yaml"
    if not path:
        raise MixloadError("quantization_config says quant_method: mixload but names no mix "
                           "config", fix="add `config: <mix.yaml>`, or rebuild with `mixload build`")
    if folder and not os.path.isabs(path):
        path = os.path.join(folder, path)
    return Settings(config=str(path), fingerprint=qc.get("fingerprint"))


def tensor_parallel() -> tuple[int, int]:
    """(TP size, TP rank) of this process, once its model-parallel groups exist. SGLang 0.5.23
    deprecates parallel_state's getters for get_parallel(); read that where it has the fields."""
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    if hasattr(parallel, "tp_size") and hasattr(parallel, "tp_rank"):
        return int(parallel.tp_size), int(parallel.tp_rank)
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def parallel_sizes() -> tuple[int, int]:
    """(TP, EP) of this SGLang process; (1, 1) before its model-parallel groups exist."""
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.runtime_context import get_parallel

    if not ps.model_parallel_is_initialized():
        return 1, 1
    return tensor_parallel()[0], max(int(get_parallel().moe_ep_size or 1), 1)


def plan_from_settings(settings: Settings, tp: int | None = None, ep: int | None = None) -> Plan:
    if tp is None or ep is None:
        tp, ep = parallel_sizes()
    plan = build_plan(load_mix(settings.config), tp=tp, ep=ep)
    if settings.fingerprint and plan.fingerprint != settings.fingerprint:
        raise MixloadError(
            f"this worker planned {plan.fingerprint}, the launcher planned {settings.fingerprint}",
            file=settings.config,
            fix="a source folder or the YAML changed after launch; restart the server")
    return plan


# ---- loading exactly the planned tensors, and proving it (core/stream.py, core/audit.py)

# SGLang's method classes -> the format each runs (what core.audit compares with the plan).
# Names, not classes: AWQ-Marlin and plain AWQ share AWQLinearMethod and differ by scheme.
METHOD_FORMATS: dict[str, str] = {
    "UnquantizedLinearMethod": "unquantized",
    "UnquantizedFusedMoEMethod": "unquantized",
    "Fp8LinearMethod": "fp8",
    "Fp8MoEMethod": "fp8",
    "GPTQMarlinLinearMethod": "gptq",
    "GPTQMarlinMoEMethod": "gptq",
    "AWQLinearMethod": "awq",
    "AWQMoEMethod": "awq",
    "CompressedTensorsLinearMethod": "compressed-tensors",
    "CompressedTensorsMoEMethod": "compressed-tensors",
}
# A method that would run the format with a fallback kernel instead of Marlin (SGLang falls
# back silently, with a warning, when a layer's shape does not fit Marlin's tiles).
MARLIN_SCHEMES = {"awq": ("AWQMarlinLinearScheme", "AWQMoEScheme")}
# Parameters SGLang's methods create and fill themselves in process_weights_after_loading.
ENGINE_INITIALIZED_SUFFIXES = (".w13_g_idx_sort_indices", ".w2_g_idx_sort_indices",
                               ".g_idx_sort_indices")


@dataclass
class LoadRecord:
    """What one load did: bytes read, tensors left to other ranks (EP), time taken."""

    stats: ReadStats = field(default_factory=ReadStats)
    skipped: set[str] = field(default_factory=set)   # other EP ranks' experts: never read
    seconds: float = 0.0
    gpu_held_bytes: int | None = None   # the GPU allocator's view of the load (None off-GPU)
    gpu_peak_bytes: int | None = None

    @property
    def bytes_read(self) -> int:
        return self.stats.bytes_read


def method_format(module: nn.Module) -> str:
    """The format a layer's quant method runs ("gptq", ...); the class name if unknown, and the
    scheme too when SGLang fell back from Marlin."""
    method = getattr(module, "quant_method", None)
    name = type(method).__name__
    fmt = METHOD_FORMATS.get(name, name)
    schemes = MARLIN_SCHEMES.get(fmt)
    scheme = type(getattr(module, "scheme", None)).__name__
    return f"{fmt} ({scheme}, not Marlin)" if schemes and scheme not in schemes else fmt


def observed_methods(model: nn.Module) -> dict[str, str]:
    """SGLang layer (its module path, which is the prefix it asked the quant config with, and
    the plan's group name) -> the format it runs. Every linear and MoE layer, including the
    ones SGLang builds without a quant config (the router)."""
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    return {name: method_format(m) for name, m in model.named_modules()
            if isinstance(m, (LinearBase, FusedMoE))}


def local_experts(layer: nn.Module) -> list[int]:
    """Global ids of the routed experts this rank holds."""
    total = int(getattr(layer, "num_experts", 0))
    to_local = getattr(layer, "_map_global_expert_id_to_local_expert_id", None)
    if to_local is None:
        return list(range(total))
    return [e for e in range(total) if to_local(e) != -1]


def rank_plan(plan: Plan, model: nn.Module) -> tuple[Plan, set[str]]:
    """The part of the plan this rank loads (core.stream.local_plan): under expert parallelism
    only its own experts, so the others are never read. Returns the view and what it leaves out."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    experts = {name: set(local_experts(m)) for name, m in model.named_modules()
               if isinstance(m, FusedMoE)}
    local = local_plan(plan, experts)
    kept = {t.name for a in local.assignments for t in a.tensors.values()}
    return local, {t.name for a in plan.assignments for t in a.tensors.values()} - kept


def layer_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter a checkpoint must fill (tied weights once), by its path."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen and not name.endswith(ENGINE_INITIALIZED_SUFFIXES):
            seen.add(id(p))
            out[name] = p
    return out


def load_weights(model: nn.Module, plan: Plan, hashes: dict[str, str] | None = None) -> LoadRecord:
    """Stream this rank's planned tensors into SGLang's own load_weights and audit the result
    (raises AuditError): every planned tensor written into a parameter, every parameter filled
    (all of it: params are armed with a sentinel first), every layer in its planned format.
    With `hashes` (lock.verify) a tensor whose bytes changed since the build raises SourceError."""
    local, skipped = rank_plan(plan, model)
    record = LoadRecord(skipped=skipped)
    methods = observed_methods(model)
    _retag(plan, lambda: audit.check_methods(local, methods))   # before a byte is read
    params = layer_params(model)
    audit.arm(params)
    planned = {t.name: (a, suffix) for a in local.assignments for suffix, t in a.tensors.items()}
    redundant: set[str] = set()
    tracker = Consumption(params)

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tracker.watch(stream(local, record.stats, hashes)):
            if audit.redundant(*planned[name], tensor):
                redundant.add(name)
            yield name, tensor

    start = time.perf_counter()
    with torch.no_grad(), tracker:
        model.load_weights(weights())
    record.seconds = time.perf_counter() - start
    observation = audit.Observation(
        methods=methods, consumed=dict(tracker.consumed), redundant=redundant,
        unfilled=audit.unfilled(params),
        dtypes={n: audit.dtype_name(p.dtype) for n, p in params.items()},
        sizes=audit.sizes(params))
    _retag(plan, lambda: audit.check(local, observation))
    return record


def _retag(plan: Plan, run: Callable[[], None]) -> None:
    """Run an audit; its error names the launcher's plan fingerprint, not the rank's view."""
    try:
        run()
    except AuditError as exc:
        raise AuditError(exc.problems, plan.fingerprint) from None


# ---- memory, as loaded

DTYPE_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def measured_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of weights (parameters) this rank holds, by the plan precision of their layer;
    layers the quant config was not asked about (norms, embeddings, router, lm_head) by their
    dtype. Buffers (RoPE caches) are not weights and are left out."""
    qc = getattr(model, "quant_config", None)
    choices = getattr(qc, "choices", {})
    out: dict[str, int] = defaultdict(int)
    for mname, module in model.named_modules():
        choice = choices.get(mname)
        for _, t in module.named_parameters(recurse=False):
            label = choice.format.precision if choice else DTYPE_PRECISION.get(t.dtype, str(t.dtype))
            out[label] += t.numel() * t.element_size()
    return dict(out)


# ---- the loader SGLang calls

class MixedModelLoader:
    """SGLang BaseModelLoader for `quantization == "mixload"` (subclassed at register time, so
    this module imports without SGLang)."""


def make_loader_class() -> type:
    from sglang.srt.model_loader.loader import BaseModelLoader

    class SGLangMixedModelLoader(BaseModelLoader):
        __doc__ = MixedModelLoader.__doc__

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.record = LoadRecord()
            self.plan: Plan | None = None
            self.report: dict[str, Any] | None = None

        def download_model(self, model_config: Any) -> None:
            """Sources are local folders named in the YAML; nothing to download."""

        def load_model(self, *, model_config: Any, device_config: Any) -> nn.Module:
            with DeviceMemory() as memory:
                model, self.plan = build_model(model_config, self.load_config, device_config)
                hashes = lock.verify(self.plan, model_config.model_path)   # checkpoints unchanged
                self.record = load_weights(model, self.plan, hashes)   # raises AuditError
                postprocess(model, torch.device(device_config.device))
            self.record.gpu_held_bytes = memory.held_bytes
            self.record.gpu_peak_bytes = memory.peak_bytes
            self.report = write_report(self.plan, model, self.record,
                                       settings_for(model_config, self.load_config))
            return model.eval()

    SGLangMixedModelLoader.__name__ = SGLangMixedModelLoader.__qualname__ = "MixedModelLoader"
    return SGLangMixedModelLoader


def settings_for(model_config: Any, load_config: Any) -> Settings:
    s = settings_from_extra(getattr(load_config, "model_loader_extra_config", None))
    if s is not None:
        return s
    qc = getattr(model_config.hf_config, "quantization_config", None) or {}
    if isinstance(qc, dict) and qc.get("quant_method") == "mixload":
        return settings_from_quant_config(qc, model_config.model_path)
    raise MixloadError("quantization is mixload but no mix config was given",
                       fix='pass --mixed-precision-config (launcher) or --model-loader-extra-config '
                           '\'{"mixload": {"config": "mix.yaml"}}\'')


def build_model(model_config: Any, load_config: Any, device_config: Any) -> tuple[nn.Module, Plan]:
    """The SGLang model class of the checkpoint, built with the plan's quant config."""
    from sglang.srt.model_loader.loader import _initialize_model
    from sglang.srt.model_loader.utils import get_model_architecture, set_default_torch_dtype

    from .quant_config import MixloadConfig

    plan = plan_from_settings(settings_for(model_config, load_config))
    model_class, _ = get_model_architecture(model_config)
    quant_config = MixloadConfig(plan, getattr(model_class, "packed_modules_mapping", {}))
    _check_device(quant_config, model_config)
    with set_default_torch_dtype(model_config.dtype), torch.device(device_config.device):
        model = _initialize_model(model_config, load_config, quant_config)
    model.quant_config = quant_config   # some SGLang models keep it, some don't; the audit reads it
    return model, plan


def _check_device(quant_config: Any, model_config: Any) -> None:
    from sglang.srt.utils import get_device_capability

    major, minor = get_device_capability()
    if major is not None and minor is not None and major * 10 + minor < quant_config.min_capability:
        raise MixloadError(f"this GPU (sm{major}{minor}) is below sm{quant_config.min_capability}, "
                           "which a format of the plan needs", fix="use bf16 for those modules")
    if model_config.dtype not in quant_config.get_supported_act_dtypes():
        raise MixloadError(f"--dtype {model_config.dtype} is not supported by every format of "
                           f"the plan (all support {quant_config.get_supported_act_dtypes()})",
                           fix="use --dtype bfloat16 or float16")


def postprocess(model: nn.Module, device: torch.device) -> None:
    """SGLang's own post-load step: repack for Marlin, requantize scales, etc."""
    from sglang.srt.model_loader import loader as sgl

    if hasattr(sgl.DefaultModelLoader, "postprocess_weights"):   # 0.5.21
        sgl.DefaultModelLoader.postprocess_weights(model, device)
        return
    for module in model.modules():   # 0.5.16/0.5.17: the same loop, inside load_weights_and_postprocess
        method = getattr(module, "quant_method", None)
        if method is not None:
            with sgl.device_loading_context(module, device):
                method.process_weights_after_loading(module)


def write_report(plan: Plan, model: nn.Module, record: LoadRecord,
                 settings: Settings | None = None) -> dict[str, Any]:
    """Log one block (plan, fingerprint, planned vs measured memory by precision) and, when a
    report folder was given, write it as JSON for the launcher's /mixload endpoint."""
    from .report import load_report, log_block
    rank = _rank()
    report = load_report(plan, measured_memory(model), record, rank)
    report["methods"] = {n: type(m.quant_method).__name__ for n, m in model.named_modules()
                         if getattr(m, "quant_method", None) is not None}
    logger.info("%s", log_block(report))
    folder = (settings.report_dir if settings else None) or os.environ.get(ENV_REPORT_DIR)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / f"rank-{rank['tp']}-dp-{rank['dp']}.json"
        path.write_text(json.dumps(report, indent=2))
    return report


def _rank() -> dict[str, int]:
    """This process's TP rank and DP replica (reports of a TP=4, DP=2 server do not collide)."""
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.runtime_context import get_parallel

    if not ps.model_parallel_is_initialized():
        return {"tp": 0, "dp": 0}
    dp = getattr(get_parallel(), "dp_rank", None)   # not in 0.5.17's ParallelContext
    return {"tp": tensor_parallel()[1], "dp": int(dp or 0)}
