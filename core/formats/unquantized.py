"""Plain floating-point weights: bf16, fp16 (and fp32), one `weight` [out, in]."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, Literal

from .base import FLOAT_DTYPES, Parallel, ScaleDtype, WeightFormat, torch_dtype

if TYPE_CHECKING:
    from torch import Tensor

_PRECISION = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


class Unquantized(WeightFormat):
    name: ClassVar[str] = "unquantized"
    dtype: Literal["BF16", "F16", "F32"] = "BF16"

    @property
    def precision(self) -> str:  # type: ignore[override]
        return _PRECISION[self.dtype]

    def label(self) -> str:
        return self.precision

    def is_stored_as(self, dtype: str) -> bool:
        return dtype in FLOAT_DTYPES

    def logical_shape(self, key_shape: tuple[int, ...]) -> tuple[int, int]:
        out, inp = key_shape
        return out, inp

    def tensor_shapes(self, out: int, inp: int) -> dict[str, tuple[int, ...]]:
        return {"weight": (out, inp)}

    def tensor_dtypes(self) -> dict[str, frozenset[str]]:
        return {"weight": FLOAT_DTYPES, "bias": FLOAT_DTYPES}

    def shard_dim(self, suffix: str, parallel: Parallel) -> int | None:
        if suffix == "bias":
            return 0 if parallel == "column" else None
        return {"column": 0, "row": 1}.get(parallel)

    def quantize(self, w: Tensor, calib: Tensor | None = None,
                 scale_dtype: ScaleDtype | None = None) -> dict[str, Tensor]:
        """Just a cast: lets a converter treat "leave it in bf16" like any other format."""
        return {"weight": w.to(torch_dtype(self.dtype))}

    def dequantize(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return tensors["weight"].float()
