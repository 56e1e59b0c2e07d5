"""The vLLM model loader "mixed": exactly the planned tensors, into vLLM's own weight loaders.

`LLM(folder, load_format="mixed")` / `vllm serve folder --load-format mixed`, where folder comes
from `mixload build`. vLLM builds the model with the mixload quant config (each layer in its
planned format); this loader checks those methods, streams the planned tensors into
`model.load_weights`, audits the result, and leaves vLLM to run process_weights_after_loading
(repacking into kernel layouts) as for any checkpoint.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from mixload.core import audit, lock
from mixload.core.device_memory import DeviceMemory
from mixload.core.errors import MixloadError
from mixload.core.plan import Plan
from mixload.core.stream import Consumption, ReadStats, local_plan, planned_bytes, stream

from .compat import is_engine_initialized, local_experts, method_format
from .quant_config import MixloadConfig

# Under vLLM's logger, whose handler prints INFO: the load report shows in vLLM's own log.
logger = logging.getLogger("vllm.mixload")
LOAD_FORMAT = "mixed"


@dataclass
class LoadReport:
    """What one load did, kept on the model as `model.mixload_report` (plain data: picklable)."""

    fingerprint: str
    planned_bytes: int       # every planned tensor this rank holds
    read_bytes: int          # tensor bytes read from the checkpoints
    param_bytes: int         # the model's parameters after loading, before any repacking
    redundant_bytes: int     # planned tensors the engine had no use for (see audit.redundant)
    tensors: int
    files_opened: int
    by_file: dict[str, int]
    # GPU allocator: what the whole load (incl. vLLM's repacking) left allocated, and its peak
    # above the start; None off-GPU.
    gpu_held_bytes: int | None = None
    gpu_peak_bytes: int | None = None


@register_model_loader(LOAD_FORMAT)
class MixedModelLoader(BaseModelLoader):
    """Loads a `mixload build` folder: its weights stay in the source checkpoints."""

    _config: MixloadConfig | None = None

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to fetch: the plan names local checkpoint folders."""

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig,
                   prefix: str = "") -> nn.Module:
        # load_weights is handed only the model; the plan lives in the quant config.
        self._config = vllm_config.quant_config
        with DeviceMemory() as memory:
            model = super().load_model(vllm_config, model_config, prefix)
        model.mixload_report.gpu_held_bytes = memory.held_bytes
        model.mixload_report.gpu_peak_bytes = memory.peak_bytes
        return model

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        if not isinstance(self._config, MixloadConfig) or self._config.plan is None:
            raise MixloadError(f"load format {LOAD_FORMAT!r} needs a folder made by "
                               "`mixload build` (config.json quant_method: mixload)",
                               file=model_config.model,
                               fix="run `mixload build mix.yaml -o DIR` and serve DIR")
        plan = self._config.plan
        hashes = lock.verify(plan, model_config.model)   # checkpoints unchanged since the build
        report = load_planned(model, plan, hashes)
        model.mixload_report = report
        logger.info("mixload: plan %s loaded: %s", report.fingerprint, asdict(report))


def load_planned(model: nn.Module, plan: Plan, hashes: dict[str, str] | None = None) -> LoadReport:
    """Stream the plan (this rank's experts only) into a freshly built vLLM model and audit
    it; raises AuditError (and SourceError for a tensor whose bytes differ from `hashes`)."""
    fingerprint = plan.fingerprint   # the folder's, not that of this rank's share
    plan = local_plan(plan, held_experts(model))
    methods = observed_methods(model)
    audit.check_methods(plan, methods)   # before a byte is read
    params = {n: p for n, p in layer_params(model).items() if not is_engine_initialized(n)}
    audit.arm(params)
    stats = ReadStats()
    planned = {t.name: (a, suffix) for a in plan.assignments for suffix, t in a.tensors.items()}
    redundant: set[str] = set()
    tracker = Consumption(params)
    current = ""   # the tensor being loaded, for the message if vLLM refuses it

    def weights():   # noqa: ANN202 - a generator of (name, tensor)
        nonlocal current
        for name, tensor in tracker.watch(stream(plan, stats, hashes)):
            if audit.redundant(*planned[name], tensor):
                redundant.add(name)
            current = name
            yield name, tensor

    with torch.no_grad(), tracker:
        try:
            model.load_weights(weights())
        except (ValueError, KeyError, AssertionError, RuntimeError, IndexError) as exc:
            if not current:
                raise
            a, suffix = planned[current]
            raise MixloadError(
                f"vLLM could not load this tensor into layer {a.module.group}: "
                f"{type(exc).__name__}: {exc}", file=a.tensors[suffix].file, tensor=current,
                rule=a.origin, fix="the layer vLLM built does not match the plan; "
                                   "run `mixload check` on the YAML") from exc
    audit.check(plan, audit.Observation(
        methods=methods,
        consumed=tracker.consumed,
        redundant=redundant,
        unfilled=audit.unfilled(params),
        dtypes={n: audit.dtype_name(p.dtype) for n, p in params.items()},
        sizes=audit.sizes(params)))
    dropped = [planned[n] for n in redundant if not tracker.consumed.get(n)]
    return LoadReport(
        fingerprint=fingerprint, planned_bytes=planned_bytes(plan),
        read_bytes=stats.bytes_read,
        param_bytes=sum(p.numel() * p.element_size() for p in params.values()),
        redundant_bytes=sum(a.tensors[suffix].nbytes for a, suffix in dropped),
        tensors=stats.tensors, files_opened=stats.files_opened, by_file=stats.by_file)


def report_of(model: nn.Module) -> LoadReport:
    """The report of the load that filled `model`: `llm.apply_model(report_of)`."""
    return model.mixload_report


def observed_methods(model: nn.Module) -> dict[str, str]:
    """Engine layer name (as its quant method was asked for) -> the format its method runs."""
    return {name: method_format(module.quant_method)
            for module in model.modules() if (name := _layer_name(module)) is not None}


def held_experts(model: nn.Module) -> dict[str, set[int]]:
    """MoE layer -> the experts this rank holds (expert parallelism splits them)."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    return {m.layer_name: local_experts(m) for m in model.modules() if isinstance(m, RoutedExperts)}


def layer_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, named by the layer it belongs to as the plan names layers: a MoE's
    `model.layers.0.mlp.experts.routed_experts.w13_weight` is `...mlp.experts.w13_weight`."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for path, module in model.named_modules():
        layer = _layer_name(module) or path
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:   # tied weights: one name, the first
                seen.add(id(p))
                out[f"{layer}.{name}" if layer else name] = p
    return out


def _layer_name(module: nn.Module) -> str | None:
    """The name vLLM asked the quant config about (linear and MoE layers only)."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase

    if isinstance(module, LinearBase):
        return module.prefix
    if isinstance(module, RoutedExperts):
        return module.layer_name
    return None
