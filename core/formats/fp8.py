"""FP8 e4m3 weights with block (Qwen3/DeepSeek `weight_scale_inv`), per-tensor or per-channel scales."""
from __future__ import annotations

from typing import ClassVar, Literal

from .base import FLOAT_DTYPES, Parallel, WeightFormat, ceil_div, per_rank

FP8_DTYPES = frozenset({"F8_E4M3"})


class Fp8(WeightFormat):
    name: ClassVar[str] = "fp8"
    precision: ClassVar[str] = "fp8"
    strategy: Literal["block", "tensor", "channel"] = "block"
    block: tuple[int, int] | None = (128, 128)   # (block_n over out, block_k over in)
    activation_scheme: Literal["dynamic", "static"] = "dynamic"

    def label(self) -> str:
        return f"fp8-{self.strategy}"

    def quantization_config(self, ignore: list[str]) -> dict | None:
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": self.activation_scheme,
              "modules_to_not_convert": ignore}
        if self.strategy == "block":
            qc["weight_block_size"] = list(self.block or (128, 128))
        return qc

    def is_stored_as(self, dtype: str) -> bool:
        return dtype in FP8_DTYPES

    @property
    def scale_name(self) -> str:
        # Block checkpoints store the inverse scale under its own name (DeepSeek-V3 convention).
        return "weight_scale_inv" if self.strategy == "block" else "weight_scale"

    def logical_shape(self, key_shape: tuple[int, ...]) -> tuple[int, int]:
        out, inp = key_shape
        return out, inp

    def tensor_shapes(self, out: int, inp: int) -> dict[str, tuple[int, ...]]:
        if self.strategy == "block":
            bn, bk = self.block or (128, 128)
            scale: tuple[int, ...] = (ceil_div(out, bn), ceil_div(inp, bk))
        elif self.strategy == "channel":
            scale = (out, 1)
        else:
            scale = ()
        shapes = {"weight": (out, inp), self.scale_name: scale}
        if self.activation_scheme == "static":
            shapes["input_scale"] = ()
        return shapes

    def tensor_dtypes(self) -> dict[str, frozenset[str]]:
        return {"weight": FP8_DTYPES, self.scale_name: FLOAT_DTYPES,
                "input_scale": FLOAT_DTYPES, "bias": FLOAT_DTYPES}

    def shard_dim(self, suffix: str, parallel: Parallel) -> int | None:
        if suffix == "weight" or (suffix == self.scale_name and self.strategy == "block"):
            return {"column": 0, "row": 1}.get(parallel)
        if suffix == self.scale_name and self.strategy == "channel":
            return 0 if parallel == "column" else None
        if suffix == "bias":
            return 0 if parallel == "column" else None
        return None

    def tp_problems(self, out: int, inp: int, parallel: Parallel, tp: int) -> list[str]:
        problems = super().tp_problems(out, inp, parallel, tp)
        if problems or self.strategy != "block":
            return problems
        bn, bk = self.block or (128, 128)
        o, i = per_rank(out, inp, parallel, tp)
        # vLLM/SGLang refuse a shard that cuts a scale block (validate_fp8_block_shape).
        if parallel == "column" and o % bn:
            problems.append(f"FP8 block {bn}: output per rank {out}/{tp}={o} is not a multiple of {bn}")
        if parallel == "row" and i % bk:
            problems.append(f"FP8 block {bk}: input per rank {inp}/{tp}={i} is not a multiple of {bk}")
        return problems
