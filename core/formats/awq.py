"""AWQ int4 GEMM: qweight [in, out/8] (nibble order 0,2,4,6,1,3,5,7), qzeros [groups, out/8], scales."""
from __future__ import annotations

from typing import ClassVar

from .base import FLOAT_DTYPES, Parallel, WeightFormat
from .gptq import INT32, int_tp_problems


class Awq(WeightFormat):
    name: ClassVar[str] = "awq"
    key: ClassVar[str] = "qweight"
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True

    @property
    def precision(self) -> str:  # type: ignore[override]
        return f"int{self.bits}"

    @property
    def pack(self) -> int:
        return 32 // self.bits

    def label(self) -> str:
        return f"awq-int{self.bits}-g{self.group_size}"

    def quantization_config(self, ignore: list[str]) -> dict | None:
        return {"quant_method": "awq", "version": "gemm", "bits": self.bits,
                "group_size": self.group_size, "zero_point": self.zero_point,
                "modules_to_not_convert": ignore}

    def groups(self, inp: int) -> int:
        return 1 if self.group_size == -1 else inp // self.group_size

    def logical_shape(self, key_shape: tuple[int, ...]) -> tuple[int, int]:
        inp, cols = key_shape
        return cols * self.pack, inp

    def tensor_shapes(self, out: int, inp: int) -> dict[str, tuple[int, ...]]:
        g = self.groups(inp)
        return {"qweight": (inp, out // self.pack), "qzeros": (g, out // self.pack),
                "scales": (g, out)}

    def tensor_dtypes(self) -> dict[str, frozenset[str]]:
        return {"qweight": INT32, "qzeros": INT32, "scales": FLOAT_DTYPES, "bias": FLOAT_DTYPES}

    def shard_dim(self, suffix: str, parallel: Parallel) -> int | None:
        if parallel == "column":
            return {"qweight": 1, "qzeros": 1, "scales": 1, "bias": 0}.get(suffix)
        if parallel == "row":
            if self.group_size == -1 and suffix in ("qzeros", "scales"):
                return None
            return {"qweight": 0, "qzeros": 0, "scales": 0}.get(suffix)
        return None

    def tp_problems(self, out: int, inp: int, parallel: Parallel, tp: int) -> list[str]:
        problems = super().tp_problems(out, inp, parallel, tp)
        return problems or int_tp_problems(self.label(), self.group_size, self.pack,
                                           out, inp, parallel, tp)
