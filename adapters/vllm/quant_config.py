"""The vLLM quantization config "mixload": per layer, vLLM's own method for the planned format.

A `mixload build` folder's config.json says `quant_method: mixload`. vLLM then builds this config
from that dict, hands it the folder (maybe_update_config), and asks it for every layer's quant
method while the model is built; the answer comes from the plan: vLLM's own Fp8 / AutoGPTQ /
AutoAWQ / unquantized methods, each configured from the planned format's quantization_config.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.quantization import (QuantizationMethods,
                                                     register_quantization_config)
from vllm.model_executor.layers.quantization.base_config import (QuantizationConfig,
                                                                 QuantizeMethodBase)

from mixload.core.build import QUANT_METHOD
from mixload.core.config import FUSED_NAMES, load as load_mix
from mixload.core.errors import MixloadError
from mixload.core.formats import WeightFormat
from mixload.core.plan import Assignment, Plan, build_plan

from .compat import int32_moe_qzeros, method_format

#: formats vLLM runs with one of its own configs (compressed-tensors mixes: not yet)
SUPPORTED = ("unquantized", "fp8", "gptq", "awq")


@register_quantization_config(QUANT_METHOD)
class MixloadConfig(QuantizationConfig):
    """Asks the plan, layer by layer; holds the plan for the "mixed" loader."""

    def __init__(self, fingerprint: str, mix: str) -> None:
        super().__init__()
        self.fingerprint = fingerprint
        self.mix = mix
        self.plan: Plan | None = None
        self._groups: dict[str, list[Assignment]] = {}
        self._engine_configs: dict[WeightFormat, QuantizationConfig] = {}

    def __repr__(self) -> str:
        return f"MixloadConfig(fingerprint={self.fingerprint}, mix={self.mix})"

    @classmethod
    def get_name(cls) -> QuantizationMethods:
        return QUANT_METHOD  # type: ignore[return-value]

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # What the quantized methods it delegates to accept (Fp8, AutoGPTQ, AutoAWQ), and float32
        # for BF16 mixes on CPUs without native bf16 (each delegated method still checks its own).
        return [torch.bfloat16, torch.half, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig
        from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
        from vllm.model_executor.layers.quantization.fp8 import Fp8Config
        return max(c.get_min_capability() for c in (Fp8Config, AutoGPTQConfig, AutoAWQConfig))

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MixloadConfig:
        # The dict is config.json's quantization_config; the folder it sits in comes next,
        # through maybe_update_config, which rebuilds the plan.
        if "fingerprint" not in config:
            raise MixloadError("quantization_config has no fingerprint",
                               fix="rebuild the folder with `mixload build`")
        return cls(str(config["fingerprint"]), str(config.get("mix", "mix.yaml")))

    def maybe_update_config(self, model_name: str, hf_config: Any = None,
                            revision: str | None = None) -> None:
        """Rebuild the plan from the folder's mix.yaml; refuse if the checkpoints changed."""
        folder = Path(model_name)
        plan = build_plan(load_mix(folder / self.mix))
        if plan.fingerprint != self.fingerprint:
            raise MixloadError(
                f"the plan's fingerprint is now {plan.fingerprint}, the folder was built for "
                f"{self.fingerprint}: a source checkpoint changed since `mixload build`",
                file=folder / "config.json", fix="re-run `mixload build` for this folder")
        unsupported = sorted({a.format.label() for a in plan.assignments
                              if not _vllm_runs(a.format)})
        if unsupported:
            raise MixloadError(f"the vLLM adapter can't run {', '.join(unsupported)}",
                               file=folder / self.mix,
                               fix="use bf16/fp16, fp8 (block or per-tensor), gptq or awq sources")
        groups: dict[str, list[Assignment]] = defaultdict(list)
        for a in plan.assignments:
            groups[a.module.group].append(a)
        self.plan, self._groups = plan, dict(groups)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.fused_moe import RoutedExperts
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        is_moe = isinstance(layer, RoutedExperts)
        if not (is_moe or isinstance(layer, LinearBase)):
            return None   # embeddings, lm_head, attention: vLLM's unquantized paths, as planned
        fmt = self._planned_format(prefix)
        if fmt.name == "unquantized":
            # RoutedExperts turns None into its own UnquantizedFusedMoEMethod(moe_config).
            return None if is_moe else UnquantizedLinearMethod()
        try:
            method = self._engine_config(fmt).get_quant_method(layer, prefix)
        except (NotImplementedError, ValueError) as exc:   # no kernel for it on this machine
            raise MixloadError(
                f"vLLM can't run this layer as {fmt.label()} here: {type(exc).__name__}: {exc}",
                tensor=prefix, rule=self._groups[prefix][0].origin,
                fix="choose another source for it, or run on a machine with that kernel") from exc
        if fmt.name == "gptq" and is_moe:
            int32_moe_qzeros(method)
        if method_format(method) != fmt.name:
            raise MixloadError(
                f"vLLM would run this layer with {type(method).__name__}, not a {fmt.label()} "
                "method", tensor=prefix, rule=self._groups[prefix][0].origin,
                fix="this vLLM can't run the layer in that format here; choose another source")
        return method

    def _planned_format(self, prefix: str) -> WeightFormat:
        if self.plan is None:
            raise MixloadError("the mixload config was used before its folder was read",
                               fix="load the model through vLLM (LLM(folder) / vllm serve folder)")
        members = self._groups.get(prefix)
        if not members:
            raise MixloadError("vLLM builds a layer the plan does not have", tensor=prefix,
                               fix="the model class and mixload's catalog disagree; report it")
        return members[0].format

    def _engine_config(self, fmt: WeightFormat) -> QuantizationConfig:
        """vLLM's own config for one format, made once from the format's quantization_config."""
        if fmt not in self._engine_configs:
            from vllm.model_executor.layers.quantization import get_quantization_config

            qc = dict(fmt.quantization_config(ignore=[]) or {})
            if fmt.name == "gptq":
                # AutoGPTQConfig quantizes only the layers it is told (normally from the
                # checkpoint's metadata): these are the ones the plan gives this format.
                qc["modules_in_block_to_quantize"] = [
                    a.module.name for a in self.plan.assignments if a.format == fmt]
            try:
                cfg = get_quantization_config(qc["quant_method"]).from_config(qc)
            except ValueError as exc:
                raise MixloadError(f"vLLM refuses {fmt.label()}: {exc}",
                                   fix="choose a source in a format this vLLM runs") from None
            # Fused names (qkv_proj, gate_up_proj) resolve through the model's mapping. vLLM's
            # Qwen3-MoE adds gate_up_proj (its dense `mlp_only_layers`) to the model instance's
            # mapping only, after this config copied the class's: add mixload's own table.
            cfg.packed_modules_mapping = {**{k: list(v) for k, v in FUSED_NAMES.items()},
                                          **self.packed_modules_mapping}
            self._engine_configs[fmt] = cfg
        return self._engine_configs[fmt]


def _vllm_runs(fmt: WeightFormat) -> bool:
    # vLLM's Fp8Config stores one scale per tensor or per 2-D block, not per channel.
    return fmt.name in SUPPORTED and getattr(fmt, "strategy", None) != "channel"
