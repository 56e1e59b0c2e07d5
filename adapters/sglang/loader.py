"""The SGLang model loader for a mixload plan: build the model with the plan's quant config, feed
it exactly the planned tensors, and prove it took them.

SGLang's `model.load_weights` silently skips names it does not know and leaves parameters it was
never given uninitialized (torch.empty). So this loader records every weight_loader call while it
streams, and ends in an audit: every planned tensor consumed, every parameter filled (each shard of
a fused parameter, each local expert), each layer's quant method the planned one. A load that
fails the audit raises; nothing half-loaded is served.

SGLang picks this loader when the model's quantization is `mixload` (the plugin wraps
`get_model_loader`); the plan's YAML comes from `--model-loader-extra-config
'{"mixload": {"config": "mix.yaml", ...}}'` (written by the launcher) or from a `mixload build`
folder's `quantization_config: {quant_method: mixload, config: ...}`.
"""
from __future__ import annotations

import contextlib
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

from mixload.core.config import load as load_mix
from mixload.core.errors import MixloadError
from mixload.core.plan import Plan, build_plan

logger = logging.getLogger(__name__)

EXTRA_KEY = "mixload"   # key in --model-loader-extra-config
ENV_REPORT_DIR = "MIXLOAD_REPORT_DIR"


class AuditError(MixloadError):
    """The engine did not take exactly what the plan says; carries every problem found."""

    def __init__(self, problems: list[str], fingerprint: str) -> None:
        self.problems = problems
        head = f"mixload audit failed for plan {fingerprint}: {len(problems)} problem(s)"
        body = "\n".join(f"  - {p}" for p in problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        super().__init__(f"{head}\n{body}{more}",
                         fix="run `mixload check` on the YAML; if it passes, this is an adapter "
                             "bug: report the plan and these lines")


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
    path = qc.get("config") or qc.get("mix_config")
    if not path:
        raise MixloadError("quantization_config says quant_method: mixload but names no mix "
                           "config", fix="add `config: <mix.yaml>`, or rebuild with `mixload build`")
    if folder and not os.path.isabs(path):
        path = os.path.join(folder, path)
    return Settings(config=str(path), fingerprint=qc.get("fingerprint"))


def parallel_sizes() -> tuple[int, int]:
    """(TP, EP) of this SGLang process; (1, 1) outside one (tests, the launcher)."""
    try:
        from sglang.srt.distributed import get_tensor_model_parallel_world_size
        from sglang.srt.runtime_context import get_parallel
        tp = get_tensor_model_parallel_world_size()
        ep = getattr(get_parallel(), "moe_ep_size", 1) or 1
        return tp, ep
    except Exception:   # noqa: BLE001 - no parallel state: a single process
        return 1, 1


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


# ---- streaming exactly the planned tensors

@dataclass
class LoadRecord:
    """What happened during one load: bytes read, and which parameter each tensor went into."""

    read: dict[str, int] = field(default_factory=dict)              # tensor -> bytes read
    skipped: set[str] = field(default_factory=set)                  # other ranks' experts
    consumed: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    writes: dict[str, set[tuple[Any, Any]]] = field(default_factory=lambda: defaultdict(set))
    seconds: float = 0.0
    current: str | None = None

    @property
    def bytes_read(self) -> int:
        return sum(self.read.values())


def planned_tensors(plan: Plan, record: LoadRecord,
                    keep: Callable[[str, int | None], bool] = lambda module, expert: True,
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every tensor of the plan, file by file in offset order,
    counting the bytes. `keep(module, expert)` drops what this rank does not hold (EP)."""
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[int, str]]] = defaultdict(list)
    for a in plan.assignments:
        if not keep(a.module.name, a.module.expert):
            record.skipped.update(t.name for t in a.tensors.values())
            continue
        for t in a.tensors.values():
            by_file[t.file].append((t.begin, t.name))
    for file, entries in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for _, name in sorted(entries):
                tensor = f.get_tensor(name)
                record.read[name] = tensor.numel() * tensor.element_size()
                record.current = name
                yield name, tensor
    record.current = None


# ---- watching SGLang's weight loaders

@contextlib.contextmanager
def recording(model: nn.Module, record: LoadRecord) -> Iterator[None]:
    """Wrap every parameter's weight_loader so each call is logged against the tensor being
    streamed; restore them afterwards (SGLang reuses them for weight updates)."""
    from sglang.srt.model_loader.weight_utils import default_weight_loader

    restore: list[Callable[[], None]] = []
    for pname, param in model.named_parameters():
        attr = "_weight_loader" if hasattr(param, "_weight_loader") else "weight_loader"
        original = getattr(param, attr, None)
        fallback = original is None
        inner = original or default_weight_loader
        setattr(param, attr, _recorder(pname, inner, record))
        restore.append(lambda p=param, a=attr, o=original, fb=fallback:
                       delattr(p, a) if fb else setattr(p, a, o))
    try:
        yield
    finally:
        for undo in restore:
            undo()


def _recorder(pname: str, inner: Callable[..., Any], record: LoadRecord) -> Callable[..., Any]:
    def weight_loader(param: nn.Parameter, loaded: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # Positional forms: linear (param, w, shard_id); FusedMoE (param, w, name, shard_id, expert_id).
        shard = kwargs.get("shard_id", args[-2] if len(args) >= 3 else args[0] if args else None)
        expert = kwargs.get("expert_id", args[-1] if len(args) >= 3 else None)
        if record.current is not None:
            record.consumed[record.current].append(pname)
        record.writes[pname].add((shard, expert))
        return inner(param, loaded, *args, **kwargs)
    return weight_loader


# ---- the audit

# What each format must become in SGLang, per layer kind. A mismatch means SGLang fell back
# (AWQ-Marlin -> AWQ, Marlin MoE -> WNA16 Triton) or the plan and the model disagree.
EXPECTED_METHOD = {
    ("unquantized", "linear"): {"UnquantizedLinearMethod"},
    ("unquantized", "moe"): {"UnquantizedFusedMoEMethod"},
    ("unquantized", "embedding"): {"UnquantizedEmbeddingMethod"},
    ("fp8", "linear"): {"Fp8LinearMethod"},
    ("fp8", "moe"): {"Fp8MoEMethod"},
    ("gptq", "linear"): {"GPTQMarlinLinearMethod"},
    ("gptq", "moe"): {"GPTQMarlinMoEMethod"},
    ("awq", "linear"): {"AWQLinearMethod"},          # AWQ-Marlin's method (scheme AWQMarlinLinearScheme)
    ("awq", "moe"): {"AWQMoEMethod"},
    ("ct-fp8", "linear"): {"CompressedTensorsLinearMethod"},
    ("ct-fp8", "moe"): {"CompressedTensorsMoEMethod", "CompressedTensorsFusedMoEMethod"},
    ("ct-int4", "linear"): {"CompressedTensorsLinearMethod"},
    ("ct-int4", "moe"): {"CompressedTensorsMoEMethod", "CompressedTensorsFusedMoEMethod"},
}
# The AWQ-Marlin scheme; plain AWQ uses the same method class with another scheme.
EXPECTED_SCHEME = {("awq", "linear"): "AWQMarlinLinearScheme", ("awq", "moe"): "AWQMoEScheme"}
# Parameters a method creates for itself (filled in process_weights_after_loading), never
# from a checkpoint.
RUNTIME_ONLY = ("g_idx_sort_indices", "workspace")


def audit(plan: Plan, model: nn.Module, record: LoadRecord) -> list[str]:
    """Every problem with this load; empty if the model holds exactly the plan."""
    problems: list[str] = []
    planned = {t.name for a in plan.assignments for t in a.tensors.values()} - record.skipped
    for name in sorted(planned - set(record.read)):
        problems.append(f"planned tensor {name} was never read")
    for name in sorted(n for n in planned & set(record.read) if not record.consumed.get(n)):
        problems.append(f"tensor {name} was streamed but SGLang's load_weights ignored it "
                        "(no parameter took it)")
    problems += _unfilled(plan, model, record)
    problems += _method_problems(plan, model)
    return problems


def _unfilled(plan: Plan, model: nn.Module, record: LoadRecord) -> list[str]:
    from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    problems = []
    optional = {t for a in plan.assignments for t in a.format.optional}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if pname.endswith(RUNTIME_ONLY):
                continue
            got = record.writes.get(full, set())
            if isinstance(module, FusedMoE):
                want = _expert_keys(module, pname)
            elif isinstance(module, QKVParallelLinear):
                want = {("q", None), ("k", None), ("v", None)}
            elif isinstance(module, MergedColumnParallelLinear):
                want = {(i, None) for i in range(len(module.output_sizes))}
            else:
                want = {None}
            if want == {None}:
                missing = set() if got else {"the whole parameter"}
            else:
                missing = {k for k in want if k not in got}
            if missing and not (pname.rsplit("_", 1)[-1] in optional or pname in optional):
                shown = sorted(map(str, missing))[:6]
                problems.append(f"parameter {full} was never filled: {', '.join(shown)}"
                                f"{' …' if len(missing) > 6 else ''}")
    return problems


def _expert_keys(layer: nn.Module, pname: str) -> set[tuple[Any, Any]]:
    """(shard, global expert id) pairs a FusedMoE parameter must receive on this rank."""
    shards = ("w1", "w3") if pname.startswith("w13") else ("w2",)
    local = local_experts(layer)
    return {(s, e) for e in local for s in shards}


def local_experts(layer: nn.Module) -> list[int]:
    """Global ids of the routed experts this rank holds."""
    total = int(getattr(layer, "num_experts", 0))
    to_local = getattr(layer, "_map_global_expert_id_to_local_expert_id", None)
    if to_local is None:
        return list(range(total))
    return [e for e in range(total) if to_local(e) != -1]


def _method_problems(plan: Plan, model: nn.Module) -> list[str]:
    """Each quantizable SGLang layer runs the method of the format `plan` gives its modules
    (the plan passed in, not the one the model was built with: they must be the same)."""
    qc = getattr(model, "quant_config", None)
    choices = getattr(qc, "choices", {})
    by_name = plan.by_name()
    problems, asked = [], set()
    for mname, module in model.named_modules():
        kind = _layer_kind(module)
        if kind is None:
            continue
        choice = choices.get(mname)
        # Layers SGLang builds without a quant config (the router, embeddings, lm_head) must
        # still be what the plan says: unquantized.
        modules = choice.modules if choice else ((mname,) if mname in by_name else ())
        if not modules:
            continue
        asked.update(modules)
        formats = {by_name[m].format for m in modules if m in by_name}
        if len(formats) != 1:
            problems.append(f"layer {mname}: the plan has no single format for {modules[:3]}")
            continue
        fmt = formats.pop()
        key = (fmt.name, kind)
        method = type(getattr(module, "quant_method", None)).__name__
        want = EXPECTED_METHOD.get(key, set())
        if method not in want:
            problems.append(f"layer {mname}: plan says {fmt.label()}, SGLang runs {method} "
                            f"(expected {'/'.join(sorted(want)) or 'a supported format'})")
            continue
        scheme = EXPECTED_SCHEME.get(key)
        if scheme and type(getattr(module, "scheme", None)).__name__ != scheme:
            problems.append(f"layer {mname}: {fmt.label()} fell back from Marlin to "
                            f"{type(getattr(module, 'scheme', None)).__name__}")
    linear = {a.module.name for a in plan.assignments if a.module.linear}
    for name in sorted(linear - asked)[:20]:
        problems.append(f"module {name} is in the plan but no SGLang layer asked for its method")
    return problems


def _layer_kind(module: nn.Module) -> str | None:
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
    from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding

    if isinstance(module, FusedMoE):
        return "moe"
    if isinstance(module, LinearBase):
        return "linear"
    if isinstance(module, VocabParallelEmbedding):   # embed_tokens and ParallelLMHead
        return "embedding"
    return None


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
            model, self.plan = build_model(model_config, self.load_config, device_config)
            self.record = load_weights(model, self.plan)
            check(self.plan, model, self.record)
            postprocess(model, torch.device(device_config.device))
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


def load_weights(model: nn.Module, plan: Plan) -> LoadRecord:
    """Stream the planned tensors of this rank into SGLang's own load_weights, recording."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    record = LoadRecord()
    local = {name: set(local_experts(m)) for name, m in model.named_modules()
             if isinstance(m, FusedMoE)}

    def keep(module: str, expert: int | None) -> bool:
        if expert is None:
            return True
        layer = module.rsplit(".experts.", 1)[0] + ".experts"
        return layer not in local or expert in local[layer]

    start = time.perf_counter()
    with recording(model, record), torch.no_grad():
        model.load_weights(planned_tensors(plan, record, keep))
    record.seconds = time.perf_counter() - start
    return record


def check(plan: Plan, model: nn.Module, record: LoadRecord) -> None:
    problems = audit(plan, model, record)
    if problems:
        raise AuditError(problems, plan.fingerprint)


def postprocess(model: nn.Module, device: torch.device) -> None:
    """SGLang's own post-load step: repack for Marlin, requantize scales, etc."""
    from sglang.srt.model_loader.loader import DefaultModelLoader
    DefaultModelLoader.postprocess_weights(model, device)


def write_report(plan: Plan, model: nn.Module, record: LoadRecord,
                 settings: Settings | None = None) -> dict[str, Any]:
    """Log one block (plan, fingerprint, planned vs measured memory by precision) and, when a
    report folder was given, write it as JSON for the launcher's /mixload endpoint."""
    from .report import load_report, log_block
    rank = _rank()
    report = load_report(plan, measured_memory(model), record, rank)
    logger.info("%s", log_block(report))
    folder = (settings.report_dir if settings else None) or os.environ.get(ENV_REPORT_DIR)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / f"rank-{rank['tp']}-dp-{rank['dp']}.json"
        path.write_text(json.dumps(report, indent=2))
    return report


def _rank() -> dict[str, int]:
    try:
        from sglang.srt.distributed import get_tensor_model_parallel_rank
        from sglang.srt.runtime_context import get_parallel
        return {"tp": get_tensor_model_parallel_rank(), "dp": getattr(get_parallel(), "dp_rank", 0) or 0}
    except Exception:   # noqa: BLE001
        return {"tp": 0, "dp": 0}
