"""Weight formats: one file per format. `detect` reads a checkpoint's quantization_config."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import SourceError
from .awq import Awq
from .base import DTYPE_BYTES, WeightFormat, config_object, shape_matches
from .compressed_tensors import CtFp8, CtInt4, compressed_tensors_formats
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


# quant_method -> the reader of that format's quantization_config
_READERS: dict[str, Callable[[dict[str, Any], object], list[WeightFormat]]] = {
    "fp8": Fp8.from_quantization_config,
    "gptq": Gptq.from_quantization_config, "gptq_marlin": Gptq.from_quantization_config,
    "awq": Awq.from_quantization_config, "awq_marlin": Awq.from_quantization_config,
    "compressed-tensors": compressed_tensors_formats,
}


def detect(qc: Any, file: object = None) -> list[WeightFormat]:
    """The quantized formats a checkpoint's `quantization_config` declares ([] if it has none,
    or null); every field is type- and range-checked, a bad one is a SourceError naming it."""
    if qc is None:
        return []
    qc = config_object(qc, "quantization_config", file)
    method = qc.get("quant_method")
    if method is None:
        raise SourceError("quantization_config has no quant_method", file=file,
                          fix="config.json must say how the weights are quantized "
                              "(quant_method: fp8, gptq, awq or compressed-tensors), or have "
                              "no quantization_config if they are not")
    reader = _READERS.get(str(method).lower())
    if reader is None:
        raise SourceError(f"quantization method {method!r} is not supported", file=file,
                          fix="use a bf16/fp16, fp8, gptq, awq or compressed-tensors checkpoint")
    return reader(qc, file)
