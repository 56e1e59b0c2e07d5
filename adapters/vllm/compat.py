"""The differences between the vLLM versions mixload supports (0.26 on GPU, 0.30 on CPU) that its
code path meets, each as one named shim. See /work/shared/engine-facts/vllm-0.26-vs-0.30.md.

Where the versions agree (register_quantization_config, register_model_loader, BaseModelLoader,
the Fp8 / AutoGPTQ / AutoAWQ configs and their method constructors, RoutedExperts), the adapter
imports vLLM directly.
"""
from __future__ import annotations

from typing import Any

import torch

from mixload.core.parameters import remake

try:   # vLLM 0.30+; 0.26 has it in vllm.entrypoints.utils
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
except ImportError:
    from vllm.entrypoints.utils import cli_env_setup  # noqa: F401

#: vLLM's method classes -> the mixload format each runs. The engine decides by class NAME in
#: places (weight_loader_v2, v0.26's intermediate_size_full for AutoGPTQMoEMethod), so the
#: adapter returns these exact classes and checks names, never subclasses. AWQ linears get
#: AutoAWQMarlinLinearMethod on CPU, and on CUDA when Marlin fits the layer.
METHOD_FORMATS: dict[str, str] = {
    "UnquantizedLinearMethod": "unquantized",
    "UnquantizedFusedMoEMethod": "unquantized",
    "Fp8LinearMethod": "fp8",
    "Fp8MoEMethod": "fp8",
    "AutoGPTQLinearMethod": "gptq",
    "AutoGPTQMoEMethod": "gptq",
    "AutoAWQLinearMethod": "awq",
    "AutoAWQMarlinLinearMethod": "awq",
    "AutoAWQMoEMethod": "awq",
    "AutoAWQXPULinearMethod": "awq",   # 0.26 on Intel XPU; removed in 0.30
}

#: Parameters the engine fills itself and no checkpoint does: 0.30's int4 MoE methods add zero
#: `w13_bias` / `w2_bias` (dropped after loading if nothing wrote them); 0.26's GPTQ MoE method
#: computes `w13_g_idx_sort_indices` / `w2_g_idx_sort_indices` after loading.
ENGINE_INITIALIZED_SUFFIXES: tuple[str, ...] = (".w13_bias", ".w2_bias",
                                                "_g_idx_sort_indices")


def method_format(method: Any) -> str:
    """The format a layer's quant method runs ("gptq", ...), or the class name if unknown."""
    name = type(method).__name__
    return METHOD_FORMATS.get(name, name)


def is_engine_initialized(param_name: str) -> bool:
    return param_name.endswith(ENGINE_INITIALIZED_SUFFIXES)


def local_experts(layer: Any) -> set[int]:
    """The global ids of the experts a RoutedExperts layer holds on this rank (all of them
    without expert parallelism). Both versions map ids with this (private) method; -1 = not here."""
    return {e for e in range(layer.global_num_experts)
            if layer._map_global_expert_id_to_local_expert_id(e) != -1}


def int32_moe_qzeros(method: Any) -> None:
    """vLLM 0.26's AutoGPTQMoEMethod creates w13_qzeros / w2_qzeros in the model dtype, so the
    packed int32 zero points are rounded on copy (the audit caught it on an H100); 0.30 creates
    them int32. Remake them int32 right after creation, as stored. A no-op on 0.30."""
    create = method.create_weights

    def create_weights(layer: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        create(layer, *args, **kwargs)
        for name in ("w13_qzeros", "w2_qzeros"):
            old = getattr(layer, name, None)
            if old is not None and old.dtype != torch.int32:
                remake(layer, name, list(old.shape), torch.int32)

    method.create_weights = create_weights   # type: ignore[method-assign]
