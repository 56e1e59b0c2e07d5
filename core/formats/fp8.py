"""FP8 e4m3 weights with block (Qwen3/DeepSeek `weight_scale_inv`), per-tensor or per-channel scales."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import PositiveInt

from ..errors import ConfigError, SourceError
from .base import (FLOAT_DTYPES, Parallel, ScaleDtype, WeightFormat, ceil_div, from_config,
                   per_rank, stored_scale)

if TYPE_CHECKING:
    from torch import Tensor

FP8_DTYPES = frozenset({"F8_E4M3"})
FP8_MAX = 448.0   # the largest finite float8_e4m3fn


class Fp8(WeightFormat):
    name: ClassVar[str] = "fp8"
    precision: ClassVar[str] = "fp8"
    strategy: Literal["block", "tensor", "channel"] = "block"
    block: tuple[PositiveInt, PositiveInt] | None = (128, 128)   # (block_n over out, block_k over in)
    activation_scheme: Literal["dynamic", "static"] = "dynamic"

    @classmethod
    def from_quantization_config(cls, qc: dict[str, Any], file: object) -> list[WeightFormat]:
        """transformers' / vLLM's `quant_method: fp8` config: weight_block_size [n, k] for block
        scales, absent (or null) for one scale per tensor."""
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise SourceError(f"quantization_config.fmt = {fmt!r}: only FP8 e4m3 weights are "
                              "supported", file=file, fix="use an e4m3 FP8 checkpoint")
        block = qc.get("weight_block_size")
        fields: dict[str, Any] = {k: qc[k] for k in ("activation_scheme",) if k in qc}
        if block is None:
            fields.update(strategy="tensor", block=None)
        else:   # JSON gives a list; anything else is reported as not a pair
            fields.update(strategy="block", block=tuple(block) if isinstance(block, list) else block)
        return [from_config(cls, file, {"block": "weight_block_size"}, **fields)]

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

    def quantize(self, w: Tensor, calib: Tensor | None = None,
                 scale_dtype: ScaleDtype | None = None) -> dict[str, Tensor]:
        """scale = amax / 448 per block, channel or tensor (the largest value lands on e4m3's
        largest); dequantized w = q * scale. Static activations also need `calib` [n, in] for
        input_scale = amax(calib) / 448."""
        import torch
        sd = scale_dtype or self.default_scale_dtype
        out, inp = w.shape
        w = w.float()
        scale = stored_scale(self._amax(w) / FP8_MAX, sd)
        # Dividing by the *stored* scale can overshoot 448 by a rounding step: clamp, don't inf.
        q = (w / self._expand(scale.float(), out, inp)).clamp(-FP8_MAX, FP8_MAX)
        tensors = {"weight": q.to(torch.float8_e4m3fn),
                   self.scale_name: scale.reshape(self.tensor_shapes(out, inp)[self.scale_name])}
        if self.activation_scheme == "static":
            if calib is None:
                raise ConfigError(f"{self.label()} with static activations needs calibration "
                                  "activations for input_scale", fix="pass calib, or use dynamic")
            tensors["input_scale"] = stored_scale(calib.float().abs().amax() / FP8_MAX, sd)
        return tensors

    def dequantize(self, tensors: Mapping[str, Tensor]) -> Tensor:
        q = tensors["weight"].float()
        return q * self._expand(tensors[self.scale_name].float(), *q.shape)

    def _amax(self, w: Tensor) -> Tensor:
        """|w|'s max per scale entry, in the scale's own shape."""
        import torch.nn.functional as F
        if self.strategy == "block":
            bn, bk = self.block or (128, 128)
            out, inp = w.shape
            rows, cols = ceil_div(out, bn), ceil_div(inp, bk)
            # Edge blocks are partial: pad with zeros, which never raise an amax.
            a = F.pad(w.abs(), (0, cols * bk - inp, 0, rows * bn - out))
            return a.reshape(rows, bn, cols, bk).amax((1, 3))
        if self.strategy == "channel":
            return w.abs().amax(1, keepdim=True)
        return w.abs().amax()

    def _expand(self, scale: Tensor, out: int, inp: int) -> Tensor:
        """The scale of every weight element, or a shape that broadcasts to [out, inp]."""
        if self.strategy == "block":
            bn, bk = self.block or (128, 128)
            return scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:out, :inp]
        return scale.reshape(out, 1) if self.strategy == "channel" else scale.reshape(())
