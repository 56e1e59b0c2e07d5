"""SGLang QuantizationConfig `mixload`: per layer, the plan's format, run by SGLang's own method.

SGLang asks a model's quant config once per layer, with the layer's *engine* prefix:
`model.layers.0.self_attn.qkv_proj` (q/k/v fused), `model.layers.0.mlp.gate_up_proj`,
`model.layers.0.mlp.experts` (every expert of the layer: one FusedMoE). The plan already made
each such group one format, so the answer is one format per prefix, and the method is the one
SGLang itself would pick for a checkpoint of that format: Fp8LinearMethod / Fp8MoEMethod,
GPTQ-Marlin and AWQ-Marlin (linear and MoE), compressed-tensors, or unquantized.

This module imports SGLang at the top: only the plugin's `register()` and the loader import it,
and both run inside an SGLang process.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.layers.linear import LinearBase
from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
from sglang.srt.layers.quantization import QUANTIZATION_METHODS
from sglang.srt.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

from mixload.core.errors import MixloadError
from mixload.core.formats import Awq, CtFp8, CtInt4, Fp8, Gptq, Unquantized, WeightFormat
from mixload.core.parameters import remake
from mixload.core.plan import Assignment, Plan

logger = logging.getLogger(__name__)

NAME = "mixload"

# Which SGLang quantization method serves each checkpoint format. Looked up by name in SGLang's
# own table at call time, so a platform plugin that swaps an entry (NPU, XPU) is respected.
DELEGATE_METHOD: dict[type[WeightFormat], str] = {
    Fp8: "fp8",
    Gptq: "gptq_marlin",
    Awq: "awq_marlin",
    CtFp8: "compressed-tensors",
    CtInt4: "compressed-tensors",
}


@dataclass(frozen=True)
class LayerChoice:
    """What the quant config answered for one SGLang layer (read by the audit and the report)."""

    prefix: str
    kind: str                 # "linear" | "moe"
    format: WeightFormat
    modules: tuple[str, ...]  # the plan's modules behind this engine layer
    method: str               # class name of the quant method returned (or SGLang's default)


class MixloadConfig(QuantizationConfig):
    """A QuantizationConfig whose answer for each layer comes from a mixload Plan."""

    def __init__(self, plan: Plan, packed_modules_mapping: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.packed_modules_mapping = dict(packed_modules_mapping or {})
        self._modules = plan.by_name()
        self._groups: dict[str, list[Assignment]] = defaultdict(list)
        for a in plan.assignments:
            self._groups[a.module.group].append(a)
        # One SGLang config per quantized format of the plan, built from the same
        # quantization_config a published checkpoint of that format carries.
        self._delegates: dict[WeightFormat, QuantizationConfig] = {
            fmt: _delegate(fmt, self.packed_modules_mapping)
            for fmt in {a.format for a in plan.assignments if a.module.linear}
            if not isinstance(fmt, Unquantized)}
        self.choices: dict[str, LayerChoice] = {}

    # ---- QuantizationConfig interface

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        dtypes = [torch.bfloat16, torch.float16, torch.float32]
        for d in self._delegates.values():
            dtypes = [t for t in dtypes if t in d.get_supported_act_dtypes()]
        return dtypes

    @classmethod
    def get_min_capability(cls) -> int:
        # The class can't know its plan; `min_capability` (per instance) is what the loader checks.
        return 0

    @property
    def min_capability(self) -> int:
        """The highest compute capability any format of this plan needs (e.g. 80 for Marlin)."""
        return max((d.get_min_capability() for d in self._delegates.values()), default=0)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MixloadConfig:
        """From a `quantization_config: {quant_method: mixload, config: mix.yaml}` (a `mixload build`
        folder). The loader normally builds the config itself from the launch flags."""
        from .loader import plan_from_settings, settings_from_quant_config
        # SGLang passes the model's hf_config along; its folder anchors a relative `mix:`.
        folder = getattr(config.get("hf_config"), "_name_or_path", None)
        settings = settings_from_quant_config(config, folder)
        return cls(plan_from_settings(settings), config.get("packed_modules_mapping"))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any] | None,
                                     user_quant: str | None) -> str | None:
        # The base checkpoint's config.json may say fp8 or gptq: with --quantization mixload
        # the plan decides, and SGLang must not reject the "mismatch".
        if user_quant == NAME or (hf_quant_cfg or {}).get("quant_method") == NAME:
            return NAME
        return None

    def get_scaled_act_names(self) -> list[str]:
        return []

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, FusedMoE):
            kind = "moe"
        elif isinstance(layer, LinearBase):
            kind = "linear"
        else:
            # Embeddings, lm_head (ParallelLMHead) and attention backends: SGLang falls back to
            # its unquantized embedding / no KV-cache scales on None, which the plan expects
            # (the catalog keeps them unquantized).
            return None
        assignments = self.assignments_for(prefix)
        fmt = _one_format(prefix, assignments)
        method = self._method(layer, kind, fmt, prefix)
        self.choices[prefix] = LayerChoice(
            prefix, kind, fmt, tuple(a.module.name for a in assignments),
            type(method).__name__ if method is not None else "UnquantizedFusedMoEMethod")
        return method

    # ---- plan lookups

    def assignments_for(self, prefix: str) -> list[Assignment]:
        """The plan's modules behind an engine layer: a fused group, a module, or the parts of a
        fused name SGLang's model declares in packed_modules_mapping."""
        if prefix in self._groups:
            return self._groups[prefix]
        if prefix in self._modules:
            return [self._modules[prefix]]
        head, _, last = prefix.rpartition(".")
        parts = [self._modules.get(f"{head}.{p}") for p in self.packed_modules_mapping.get(last, ())]
        if parts and all(parts):
            return parts  # type: ignore[return-value]
        there = sorted(n for n in self._modules if n.startswith(f"{head}."))
        if there:   # config.json describes another structure here than SGLang builds
            raise MixloadError(
                f"SGLang builds a layer {prefix!r} where config.json describes "
                f"{', '.join(there[:3])}{' …' if len(there) > 3 else ''}: this SGLang's model "
                "class does not follow the checkpoint's config (SGLang's Qwen3-MoE ignores "
                "mlp_only_layers and decoder_sparse_step), so the layer could not be loaded",
                file=self.plan.config.file,
                fix="serve this checkpoint with vLLM, whose model class follows the config")
        raise MixloadError(
            f"SGLang builds a quantizable layer {prefix!r} that the plan has no module for",
            file=self.plan.config.file,
            fix="the catalog (mixload.core.catalog) must list this module for this architecture")

    def _method(self, layer: torch.nn.Module, kind: str, fmt: WeightFormat,
                prefix: str) -> QuantizeMethodBase | None:
        if isinstance(fmt, Unquantized):
            # FusedMoE builds UnquantizedFusedMoEMethod itself from None, with its own backend
            # flags; a LinearBase needs the method object.
            return UnquantizedLinearMethod() if kind == "linear" else None
        method = self._delegates[fmt].get_quant_method(layer, prefix)
        if method is None:
            raise MixloadError(f"SGLang's {DELEGATE_METHOD[type(fmt)]} config has no method for "
                               f"{type(layer).__name__} {prefix!r} ({fmt.label()})",
                               fix="use another source format for this module")
        if kind == "moe" and isinstance(fmt, Gptq):
            _fix_gptq_moe_params(method)
        return method


def _one_format(prefix: str, assignments: list[Assignment]) -> WeightFormat:
    formats = {a.format for a in assignments}
    if len(formats) != 1:
        # The plan resolves fused groups (on_conflict); reaching here is a planner bug.
        raise MixloadError(f"engine layer {prefix} would mix formats "
                           f"{sorted(f.label() for f in formats)}: the engine runs one quant "
                           "method per fused layer", fix="set on_conflict: promote | demote")
    return formats.pop()


def _delegate(fmt: WeightFormat, packed: dict[str, list[str]]) -> QuantizationConfig:
    """SGLang's own config for one checkpoint format, built from that format's config.json
    `quantization_config` with nothing ignored (the plan routes only its own layers here)."""
    name = DELEGATE_METHOD.get(type(fmt))
    if name is None or name not in QUANTIZATION_METHODS:
        raise MixloadError(f"the SGLang adapter has no method for format {fmt.label()}",
                           fix=f"supported: {', '.join(sorted(f.__name__ for f in DELEGATE_METHOD))}")
    qc = fmt.quantization_config([]) or {}
    qc = {**qc, "packed_modules_mapping": packed}
    config = QUANTIZATION_METHODS[name].from_config(qc)
    config.packed_modules_mapping = packed
    return config


def _fix_gptq_moe_params(method: QuantizeMethodBase) -> None:
    """Three SGLang 0.5.17-0.5.21 GPTQ-Marlin MoE parameters that lose or break checkpoint data,
    remade right after SGLang creates them (same method class, same weight loader; no-ops where
    already right), as vLLM creates them:

    - w13_scales / w2_scales are created fp16 whatever the model dtype, and the Marlin MoE kernel
      asserts activations and scales share a dtype: a BF16 model with GPTQ experts (the classic
      mix) fails at its first forward (measured on H100, SGLang 0.5.17). Create them in the
      model dtype; the fp16 checkpoint scales are cast on copy, as for every float tensor.

    - w13_qzeros / w2_qzeros are created in the model dtype (bf16), so the packed int32 zero
      points are rounded on copy. Marlin's symmetric GPTQ never reads them, but a load that
      silently changes bits is not "the planned tensors": keep them int32, as stored.
    - w2_scales / w2_qzeros are sized for the *full* intermediate size when act-order is off
      (the condition is inverted from vLLM's and from the compressed-tensors MoE method of the
      same release) while the loader writes only this rank's groups into the leading rows: at
      MoE-TP > 1 the other rows stay uninitialized and the Marlin scale permutation sees the
      wrong K. Size them to this rank's groups.
    """
    create = method.create_weights

    def create_weights(layer: torch.nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra: Any) -> None:
        create(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
               **extra)
        cfg = method.quant_config
        w2_groups = (intermediate_size_per_partition // cfg.group_size
                     if cfg.group_size != -1 and not cfg.desc_act else None)
        for name in ("w13_qzeros", "w2_qzeros", "w13_scales", "w2_scales"):
            old = getattr(layer, name)
            shape = list(old.shape)
            if name.startswith("w2") and w2_groups is not None:
                shape[1] = w2_groups
            dtype = torch.int32 if name.endswith("qzeros") else params_dtype
            if shape != list(old.shape) or dtype != old.dtype:
                remake(layer, name, shape, dtype)

    method.create_weights = create_weights   # type: ignore[method-assign]
