"""Weight formats: one file per format. `detect` reads a checkpoint's quantization_config."""
from __future__ import annotations

from typing import Any

from ..errors import SourceError
from .awq import Awq
from .base import DTYPE_BYTES, WeightFormat, shape_matches
from .compressed_tensors import CtFp8, CtInt4
from .fp8 import Fp8
from .gptq import Gptq
from .unquantized import Unquantized

__all__ = ["Awq", "CtFp8", "CtInt4", "DTYPE_BYTES", "Fp8", "Gptq", "Unquantized", "WeightFormat",
           "detect", "shape_matches", "torch_dtype_name"]

_TORCH_DTYPES = {"bfloat16": "BF16", "float16": "F16", "half": "F16", "float32": "F32",
                 "float": "F32"}


def torch_dtype_name(config: dict[str, Any]) -> str:
    """The safetensors dtype of the unquantized weights a config.json declares (BF16 if silent)."""
    raw = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return _TORCH_DTYPES.get(str(raw).removeprefix("torch."), "BF16")


def detect(qc: dict[str, Any] | None, file: object = None) -> list[WeightFormat]:
    """The quantized formats a checkpoint's `quantization_config` declares ([] if none)."""
    if not qc:
        return []
    method = str(qc.get("quant_method", "")).lower()
    try:
        if method == "fp8":
            block = qc.get("weight_block_size")
            return [Fp8(strategy="block" if block else "tensor",
                        block=tuple(block) if block else None,
                        activation_scheme=qc.get("activation_scheme", "dynamic"))]
        if method in ("gptq", "gptq_marlin"):
            return [Gptq(bits=qc.get("bits", 4), group_size=qc.get("group_size", 128),
                         sym=qc.get("sym", True), desc_act=qc.get("desc_act", False),
                         checkpoint_format=qc.get("checkpoint_format", "gptq"))]
        if method in ("awq", "awq_marlin"):
            version = str(qc.get("version", "gemm")).lower()
            if version != "gemm":
                raise SourceError(f"AWQ version {version!r} is not supported (only GEMM)",
                                  file=file, fix="use an AWQ GEMM checkpoint")
            return [Awq(bits=qc.get("bits", qc.get("w_bit", 4)),
                        group_size=qc.get("group_size", qc.get("q_group_size", 128)),
                        zero_point=qc.get("zero_point", True))]
        if method == "compressed-tensors":
            return _compressed_tensors(qc, file)
    except (TypeError, ValueError) as exc:   # pydantic's ValidationError is a ValueError
        raise SourceError(f"quantization_config ({method}) has an invalid value: {exc}",
                          file=file, fix="check the checkpoint's config.json") from None
    raise SourceError(f"quantization method {method!r} is not supported", file=file,
                      fix="use a bf16/fp16, fp8, gptq, awq or compressed-tensors checkpoint")


def _compressed_tensors(qc: dict[str, Any], file: object) -> list[WeightFormat]:
    formats: list[WeightFormat] = []
    for group in (qc.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        strategy = w.get("strategy", "tensor")
        if w.get("type") == "float" and w.get("num_bits") == 8:
            acts = group.get("input_activations") or {}
            formats.append(CtFp8(
                strategy=strategy, block=tuple(w["block_structure"]) if strategy == "block" else None,
                activation_scheme="dynamic" if not acts or acts.get("dynamic", True) else "static"))
        elif w.get("type", "int") == "int" and w.get("num_bits") in (4, 8):
            formats.append(CtInt4(bits=w["num_bits"],
                                  group_size=w.get("group_size") or -1 if strategy == "group" else -1,
                                  symmetric=w.get("symmetric", True)))
        else:
            raise SourceError(f"compressed-tensors scheme {w} is not supported", file=file,
                              fix="use pack-quantized int4/int8 or float-quantized fp8")
    return formats
