"""compressed-tensors (llm-compressor): pack-quantized int4 and float-quantized fp8."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import SourceError
from .base import (FLOAT_DTYPES, GroupSize, Parallel, ScaleDtype, WeightFormat, config_object, from_config,
                   pack_int, unpack_int)
from .fp8 import Fp8
from .gptq import (INT32, MarlinBits, check_int_shape, dequantize_int, PackedInt,
                   quantize_int, sequential_groups)

if TYPE_CHECKING:
    from torch import Tensor


def _ct_config(weights: dict[str, Any], activations: dict[str, Any] | None, fmt: str,
               ignore: list[str]) -> dict[str, Any]:
    """A compressed-tensors quantization_config with one scheme for every Linear but `ignore`
    (exact module names; vLLM also accepts "re:" regexes there)."""
    return {"quant_method": "compressed-tensors", "format": fmt,
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": activations,
                                          "output_activations": None}},
            "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}}


def compressed_tensors_formats(qc: dict[str, Any], file: object) -> list[WeightFormat]:
    """The formats of a `quant_method: compressed-tensors` config, one per config group
    (none: a sparsity-only config)."""
    formats: list[WeightFormat] = []
    groups = qc.get("config_groups")
    for name, group in ({} if groups is None else
                        config_object(groups, "quantization_config.config_groups", file)).items():
        where = f"config_groups.{name}"
        group = config_object(group, f"quantization_config.{where}", file)
        w = config_object(group.get("weights"), f"quantization_config.{where}.weights", file)
        acts = group.get("input_activations")
        if acts is not None:
            acts = config_object(acts, f"quantization_config.{where}.input_activations", file)
        keys = {"strategy": f"{where}.weights.strategy", "bits": f"{where}.weights.num_bits",
                "group_size": f"{where}.weights.group_size",
                "symmetric": f"{where}.weights.symmetric",
                "block": f"{where}.weights.block_structure"}
        kind, bits, strategy = w.get("type", "int"), w.get("num_bits"), w.get("strategy", "tensor")
        if kind == "float" and bits == 8:
            block = w.get("block_structure") if strategy == "block" else None
            formats.append(from_config(
                CtFp8, file, keys, strategy=strategy,
                block=tuple(block) if isinstance(block, list) else block,
                activation_scheme="dynamic" if not acts or acts.get("dynamic", True) else "static"))
        elif kind == "int" and bits in (4, 8):
            layout = group.get("format") or qc.get("format") or "pack-quantized"
            if layout != "pack-quantized" or strategy not in ("group", "channel"):
                raise SourceError(f"compressed-tensors int weights stored {layout!r} with "
                                  f"strategy {strategy!r} are not supported", file=file,
                                  fix="use a pack-quantized checkpoint with group or channel "
                                      "scales (llm-compressor's W4A16 / W8A16)")
            formats.append(from_config(
                CtInt4, file, keys, bits=bits, symmetric=w.get("symmetric", True),
                group_size=w.get("group_size") if strategy == "group" else -1))
        else:
            raise SourceError(f"compressed-tensors scheme {w} (quantization_config.{where}."
                              "weights) is not supported", file=file,
                              fix="use pack-quantized int4/int8 or float-quantized fp8")
    return formats


class CtInt4(PackedInt, WeightFormat):
    """`weight_packed` I32 [out, in/8], `weight_scale` [out, groups], `weight_shape` I64 [2];
    asymmetric adds `weight_zero_point` I32 [out/8, groups].

    compressed-tensors quantizes to *signed* q in [-8, 7] (and a signed zero point) and packs
    q + 8 in both the symmetric and the asymmetric scheme (pack_to_int32's offset), so the stored
    nibble is the usual unsigned q: symmetric dequantizes as (nibble - 8) * scale."""

    name: ClassVar[str] = "ct-int4"
    label_prefix: ClassVar[str] = "ct"
    key: ClassVar[str] = "weight_packed"
    optional: ClassVar[frozenset[str]] = frozenset({"bias", "weight_g_idx"})
    # llm-compressor computes scales in the weight's dtype: BF16 for today's models.
    default_scale_dtype: ClassVar[ScaleDtype] = "BF16"
    bits: MarlinBits = 4
    group_size: GroupSize = 128
    symmetric: bool = True

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

    def quantization_config(self, ignore: list[str]) -> dict | None:
        channel = self.group_size == -1
        weights = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                   "strategy": "channel" if channel else "group",
                   "group_size": None if channel else self.group_size,
                   "dynamic": False, "actorder": None, "observer": "minmax"}
        return _ct_config(weights, None, "pack-quantized", ignore)

    def quantize(self, w: Tensor, calib: Tensor | None = None,
                 scale_dtype: ScaleDtype | None = None) -> dict[str, Tensor]:
        """RTN, or GPTQ with `calib` (llm-compressor's GPTQModifier writes this format)."""
        import torch
        check_int_shape(self.label(), *w.shape, self.group_size, self.pack)
        r = quantize_int(w, self.bits, self.group_size, self.symmetric,
                         scale_dtype or self.default_scale_dtype, calib)
        tensors = {"weight_packed": pack_int(r.q, self.bits, dim=1), "weight_scale": r.scale,
                   "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}
        if not self.symmetric:
            tensors["weight_zero_point"] = pack_int(r.zero, self.bits, dim=0)
        return tensors

    def dequantize(self, tensors: Mapping[str, Tensor]) -> Tensor:
        import torch
        q = unpack_int(tensors["weight_packed"], self.bits, dim=1)
        scale = tensors["weight_scale"]
        zp = tensors.get("weight_zero_point")
        zero = (unpack_int(zp, self.bits, dim=0) if zp is not None
                else torch.full(scale.shape, 2 ** (self.bits - 1), dtype=torch.int32,
                             device=scale.device))
        g_idx = tensors.get("weight_g_idx")
        if g_idx is None:
            g_idx = sequential_groups(q.shape[1], self.group_size, q.device)
        return dequantize_int(q, scale, zero, g_idx)


class CtFp8(Fp8):
    """float-quantized fp8: like `Fp8`, but every strategy names its scale `weight_scale`."""

    name: ClassVar[str] = "ct-fp8"
    default_scale_dtype: ClassVar[ScaleDtype] = "BF16"   # as CtInt4: the weight's dtype

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

    def quantization_config(self, ignore: list[str]) -> dict | None:
        block = list(self.block or (128, 128)) if self.strategy == "block" else None
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": self.strategy,
                   "block_structure": block, "dynamic": False, "observer": "minmax"}
        if self.activation_scheme == "static":
            acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                    "dynamic": False, "observer": "minmax"}
        else:   # per token, or per 1 x block_k group to match block weights (FP8_BLOCK)
            acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                    "strategy": "group" if block else "token",
                    "group_size": block[1] if block else None, "observer": None}
        return _ct_config(weights, acts, "float-quantized", ignore)
