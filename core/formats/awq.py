"""AWQ int4 GEMM: qweight [in, out/8] (nibble order 0,2,4,6,1,3,5,7), qzeros [groups, out/8], scales."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import SourceError
from .base import (FLOAT_DTYPES, GroupSize, Parallel, ScaleDtype, WeightFormat, from_config,
                   int_in, pack_int, unpack_int)
from .gptq import (INT32, check_int_shape, dequantize_int, PackedInt, quantize_int,
                   sequential_groups)

if TYPE_CHECKING:
    from torch import Tensor

#: AWQ GEMM word layout: bits [4k, 4k+4) hold output column ORDER[k] of each run of 8, the
#: order its CUDA kernel's dequantize unpacks them in.
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
NibbleBits = int_in(4)   # the GEMM layout packs 4-bit values only


class Awq(PackedInt, WeightFormat):
    label_prefix: ClassVar[str] = "awq"
    name: ClassVar[str] = "awq"
    key: ClassVar[str] = "qweight"
    bits: NibbleBits = 4
    group_size: GroupSize = 128
    zero_point: bool = True
    default_scale_dtype: ClassVar[ScaleDtype] = "F16"   # AutoAWQ writes F16

    @classmethod
    def from_quantization_config(cls, qc: dict[str, Any], file: object) -> list[WeightFormat]:
        version = qc.get("version", "gemm")
        if not isinstance(version, str) or version.lower() != "gemm":
            raise SourceError(f"AWQ version {version!r} is not supported (only GEMM)",
                              file=file, fix="use an AWQ GEMM checkpoint")
        # AutoAWQ's own spellings (w_bit, q_group_size) and the transformers ones
        keys = {"bits": "w_bit" if "w_bit" in qc and "bits" not in qc else "bits",
                "group_size": "q_group_size" if "q_group_size" in qc and "group_size" not in qc
                else "group_size", "zero_point": "zero_point"}
        return [from_config(cls, file, keys, **{f: qc[k] for f, k in keys.items() if k in qc})]

    def quantization_config(self, ignore: list[str]) -> dict | None:
        return {"quant_method": "awq", "version": "gemm", "bits": self.bits,
                "group_size": self.group_size, "zero_point": self.zero_point,
                "modules_to_not_convert": ignore}

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

    def quantize(self, w: Tensor, calib: Tensor | None = None,
                 scale_dtype: ScaleDtype | None = None) -> dict[str, Tensor]:
        """RTN with a zero point. With `calib`, GPTQ's error compensation fills the same layout
        (AWQ's own activation-aware scaling must be folded into the previous layer, which a
        per-module function can't do). zero_point=False stores the symmetric zero 8, because
        the GEMM kernels always subtract qzeros."""
        check_int_shape(self.label(), *w.shape, self.group_size, self.pack)
        r = quantize_int(w, self.bits, self.group_size, not self.zero_point,
                         scale_dtype or self.default_scale_dtype, calib)
        return {"qweight": pack_int(r.q.T, self.bits, dim=1, order=ORDER),
                "qzeros": pack_int(r.zero.T, self.bits, dim=1, order=ORDER),
                "scales": r.scale.T.contiguous()}

    def dequantize(self, tensors: Mapping[str, Tensor]) -> Tensor:
        q = unpack_int(tensors["qweight"], self.bits, dim=1, order=ORDER).T      # [out, in]
        zero = unpack_int(tensors["qzeros"], self.bits, dim=1, order=ORDER).T    # [out, groups]
        return dequantize_int(q, tensors["scales"].T, zero,
                              sequential_groups(q.shape[1], self.group_size, q.device))
