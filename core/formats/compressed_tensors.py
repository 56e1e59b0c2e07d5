"""compressed-tensors (llm-compressor): pack-quantized int4 and float-quantized fp8."""
from __future__ import annotations

from typing import ClassVar

from .base import FLOAT_DTYPES, Parallel, WeightFormat
from .fp8 import Fp8
from .gptq import INT32, int_tp_problems


class CtInt4(WeightFormat):
    """`weight_packed` I32 [out, in/8] holding q+8 (sym) or q (asym), `weight_scale` [out, groups]."""

    name: ClassVar[str] = "ct-int4"
    key: ClassVar[str] = "weight_packed"
    optional: ClassVar[frozenset[str]] = frozenset({"bias", "weight_g_idx"})
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    @property
    def precision(self) -> str:  # type: ignore[override]
        return f"int{self.bits}"

    @property
    def pack(self) -> int:
        return 32 // self.bits

    def label(self) -> str:
        return f"ct-int{self.bits}-g{self.group_size}"

    def groups(self, inp: int) -> int:
        return 1 if self.group_size == -1 else inp // self.group_size

    def logical_shape(self, key_shape: tuple[int, ...]) -> tuple[int, int]:
        out, cols = key_shape
        return out, cols * self.pack

    def tensor_shapes(self, out: int, inp: int) -> dict[str, tuple[int, ...]]:
        g = self.groups(inp)
        shapes = {"weight_packed": (out, inp // self.pack), "weight_scale": (out, g),
                  "weight_shape": (2,)}
        if not self.symmetric:
            shapes["weight_zero_point"] = (out // self.pack, g)
        return shapes

    def tensor_dtypes(self) -> dict[str, frozenset[str]]:
        return {"weight_packed": INT32, "weight_scale": FLOAT_DTYPES,
                "weight_shape": frozenset({"I32", "I64"}), "weight_zero_point": INT32,
                "weight_g_idx": INT32, "bias": FLOAT_DTYPES}

    def shard_dim(self, suffix: str, parallel: Parallel) -> int | None:
        if suffix in ("weight_shape",):
            return None
        if parallel == "column":
            return 0 if suffix != "weight_g_idx" else None
        if parallel == "row":
            if self.group_size == -1 and suffix in ("weight_scale", "weight_zero_point"):
                return None
            return 0 if suffix == "weight_g_idx" else (1 if suffix != "bias" else None)
        return None

    def tp_problems(self, out: int, inp: int, parallel: Parallel, tp: int) -> list[str]:
        problems = super().tp_problems(out, inp, parallel, tp)
        return problems or int_tp_problems(self.label(), self.group_size, self.pack,
                                           out, inp, parallel, tp)


class CtFp8(Fp8):
    """float-quantized fp8: like `Fp8`, but every strategy names its scale `weight_scale`."""

    name: ClassVar[str] = "ct-fp8"

    def label(self) -> str:
        return f"ct-fp8-{self.strategy}"

    @property
    def scale_name(self) -> str:
        return "weight_scale"

    def tensor_shapes(self, out: int, inp: int) -> dict[str, tuple[int, ...]]:
        shapes = super().tensor_shapes(out, inp)
        if self.strategy == "tensor":
            shapes["weight_scale"] = (1,)
        return shapes
