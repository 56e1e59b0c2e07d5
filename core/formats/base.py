"""What every weight format tells the rest of mixload: its tensors, shapes, dtypes and TP rules.

A format describes one *linear* module (out_features x in_features) as stored in a checkpoint.
Non-linear modules (norms, embeddings, router gates) are always `Unquantized`.

Each format also quantizes one weight W [out, in] into its tensors and dequantizes them back
(a float32 reference). torch is imported inside those functions, not here: planning reads only
safetensors headers and must neither need torch installed nor pay its import time (~2 s).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictInt, ValidationError

from ..errors import SourceError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

Parallel = Literal["column", "row", "replicated"]
ScaleDtype = Literal["F32", "BF16", "F16"]   # all three occur in published checkpoints
FLOAT_DTYPES = frozenset({"F32", "BF16", "F16"})
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def int_in(*allowed: int) -> Any:
    """An integer field (not a bool, not a float) that must be one of `allowed`."""
    def check(value: int) -> int:
        if value not in allowed:
            raise ValueError(f"must be {' or '.join(map(str, allowed))}")
        return value
    return Annotated[StrictInt, AfterValidator(check)]


def _group_size(value: int) -> int:
    if value != -1 and value <= 0:
        raise ValueError("must be a positive number of inputs per scale, or -1 (one group "
                         "per output channel)")
    return value


GroupSize = Annotated[StrictInt, AfterValidator(_group_size)]


class WeightFormat(BaseModel):
    """A storage format of a linear module; subclasses are small frozen pydantic models whose
    fields are typed strictly and range-checked (a checkpoint's config.json fills them)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: ClassVar[str]
    precision: ClassVar[str]   # family shown in reports: bf16 | fp16 | fp32 | fp8 | int4 | int8
    #: the tensor whose presence says "this module is stored in this format"
    key: ClassVar[str] = "weight"
    optional: ClassVar[frozenset[str]] = frozenset({"bias"})
    #: dtype of the scales `quantize` writes when the caller does not choose one
    default_scale_dtype: ClassVar[ScaleDtype] = "F32"

    @property
    def weight_bits(self) -> int:
        """Bits per weight element, for promote/demote ordering."""
        return {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}[self.precision]

    def label(self) -> str:
        return self.name

    def quantization_config(self, ignore: list[str]) -> dict | None:
        """The config.json `quantization_config` engines read for a checkpoint in this format;
        `ignore` lists the modules left unquantized (router gates, lm_head)."""
        return None

    def is_stored_as(self, dtype: str) -> bool:
        """Whether a key tensor of this dtype is this format (fp8 and bf16 both use `weight`)."""
        return True

    def logical_shape(self, key_shape: tuple[int, ...]) -> tuple[int, int]:
        """(out_features, in_features) from the shape of the key tensor."""
        raise NotImplementedError

    def tensor_shapes(self, out: int, inp: int) -> dict[str, tuple[int, ...]]:
        """Every required tensor suffix of a module of this logical shape, with its shape."""
        raise NotImplementedError

    def tensor_dtypes(self) -> dict[str, frozenset[str]]:
        """Allowed dtypes per suffix; scales are read from the header, never assumed."""
        raise NotImplementedError

    def shard_dim(self, suffix: str, parallel: Parallel) -> int | None:
        """The tensor dim that tensor parallelism splits (None: every rank holds all of it)."""
        raise NotImplementedError

    def tp_problems(self, out: int, inp: int, parallel: Parallel, tp: int) -> list[str]:
        """Why a module of this shape can't be split tp ways in this format (empty if it can)."""
        return _even_split(out, inp, parallel, tp)

    def quantize(self, w: Tensor, calib: Tensor | None = None,
                 scale_dtype: ScaleDtype | None = None) -> dict[str, Tensor]:
        """The tensors (suffix -> tensor) storing the linear weight `w` [out, in] in this format:
        exactly those `tensor_shapes` lists. `calib` holds input activations [n, in] for the
        formats that can use them; scales are written in `scale_dtype` (default: the format's)."""
        raise NotImplementedError

    def dequantize(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """The float32 weight [out, in] these tensors store (a reference, not a kernel).
        Scale dtypes are read from the tensors, never assumed."""
        raise NotImplementedError


F = TypeVar("F", bound=WeightFormat)


def from_config(cls: type[F], file: object, keys: Mapping[str, str] | None = None,
                **fields: Any) -> F:
    """`cls(**fields)` with values read from a quantization_config; a value of the wrong type
    or out of range is a SourceError naming the config key (`keys`: field -> its path in the
    quantization_config, where they differ)."""
    try:
        return cls(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        field, *index = err["loc"] or ("?",)
        key = (keys or {}).get(str(field), str(field))
        value, why = err["input"], str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing":   # a tuple item: name the whole (too short) value
            value, why = fields.get(str(field)), "too few entries"
        else:
            key += "".join(f"[{i}]" for i in index)
        value = list(value) if isinstance(value, tuple) else value   # as config.json wrote it
        raise SourceError(f"quantization_config.{key} = {value!r} is not valid for "
                          f"{cls.name}: {why}", file=file,
                          fix=f"correct quantization_config.{key} in config.json (the value "
                              "the checkpoint was quantized with), or re-download it") from None


def config_object(value: Any, key: str, file: object) -> dict[str, Any]:
    """`value`, the quantization_config (or its part `key`), which must be a JSON object."""
    if not isinstance(value, dict):
        kind = {list: "a list", str: "a string", type(None): "null"}.get(type(value), repr(value))
        raise SourceError(f"{key} is {kind}, not an object", file=file,
                          fix=f"{key} in config.json must be an object as the quantization tool "
                              "wrote it; re-download the checkpoint's config.json")
    return value


def _even_split(out: int, inp: int, parallel: Parallel, tp: int) -> list[str]:
    if parallel == "column" and out % tp:
        return [f"output size {out} is not divisible by TP={tp}"]
    if parallel == "row" and inp % tp:
        return [f"input size {inp} is not divisible by TP={tp}"]
    return []


def per_rank(out: int, inp: int, parallel: Parallel, tp: int) -> tuple[int, int]:
    """The (out, in) one TP rank holds."""
    if parallel == "column":
        return out // tp, inp
    if parallel == "row":
        return out, inp // tp
    return out, inp


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def shape_matches(expected: tuple[int, ...], actual: tuple[int, ...]) -> bool:
    """Exact, except that a scalar scale may be stored as () or (1,) — both occur in the wild."""
    if tuple(expected) == tuple(actual):
        return True
    return len(expected) <= 1 and len(actual) <= 1 and _numel(expected) == _numel(actual) == 1


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- helpers shared by quantize / dequantize (torch imported lazily, see the module docstring)

@cache   # called per tensor on the load path
def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (any of DTYPE_BYTES)."""
    import torch
    return {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
            "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
            "U8": torch.uint8, "BOOL": torch.bool}[name]


@cache
def safetensors_dtype(dtype: torch.dtype) -> str | None:
    """The safetensors name of a torch dtype ("BF16", "I32", ...); None if it has none."""
    return next((n for n in DTYPE_BYTES if torch_dtype(n) == dtype), None)


def stored_scale(scale: Tensor, dtype: ScaleDtype) -> Tensor:
    """`scale` rounded to the dtype it is stored in. Quantizing against the stored value (not the
    exact one) keeps dequantize(quantize(w)) as close as it can be. A zero scale (an all-zero
    group, or F16 underflow) becomes 1: its values quantize to 0 either way, and nothing divides
    by zero."""
    import torch
    s = scale.to(torch_dtype(dtype))
    return torch.where(s == 0, torch.ones_like(s), s)


def pack_int(q: Tensor, bits: int, dim: int, order: Sequence[int] | None = None) -> Tensor:
    """Pack unsigned `bits`-wide integers 32 // bits to an int32 word along `dim`.

    Value k of each run of 32 // bits goes to bits [k*bits, (k+1)*bits), lowest first, unless
    `order` is given: then bits [k*bits, ...) hold value order[k] (AWQ's interleave).
    """
    import torch
    per = 32 // bits
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise ValueError(f"values outside [0, {(1 << bits) - 1}] can't be packed in {bits} bits")
    v = q.movedim(dim, -1).to(torch.int64)
    if v.shape[-1] % per:
        raise ValueError(f"dim {dim} of size {v.shape[-1]} is not a multiple of {per}")
    v = v.reshape(*v.shape[:-1], -1, per)
    if order is not None:
        v = v[..., list(order)]
    words = (v << (torch.arange(per, dtype=torch.int64, device=q.device) * bits)).sum(-1)   # in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words)               # as int32 bits
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int(words: Tensor, bits: int, dim: int, order: Sequence[int] | None = None) -> Tensor:
    """Inverse of `pack_int`: int32 [.., n, ..] -> int32 values [.., n * 32 // bits, ..]."""
    import torch
    per = 32 // bits
    w = words.movedim(dim, -1).to(torch.int32)
    # >> on int32 copies the sign bit; the mask drops it.
    v = (w.unsqueeze(-1) >> (torch.arange(per, dtype=torch.int32, device=w.device) * bits)) & ((1 << bits) - 1)
    if order is not None:
        v = v[..., sorted(range(per), key=lambda k: order[k])]
    return v.reshape(*w.shape[:-1], -1).movedim(-1, dim)
