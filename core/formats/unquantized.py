"""Plain floating-point weights: bf16, fp16 (and fp32), one `weight` [out, in]."""
from __future__ import annotations

from typing import ClassVar, Literal

from .base import FLOAT_DTYPES, Parallel, WeightFormat

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
