"""What every weight format tells the rest of mixload: its tensors, shapes, dtypes and TP rules.

A format describes one *linear* module (out_features x in_features) as stored in a checkpoint.
Non-linear modules (norms, embeddings, router gates) are always `Unquantized`.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

Parallel = Literal["column", "row", "replicated"]
FLOAT_DTYPES = frozenset({"F32", "BF16", "F16"})
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class WeightFormat(BaseModel):
    """A storage format of a linear module; subclasses are small frozen pydantic models."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ClassVar[str]
    precision: ClassVar[str]   # family shown in reports: bf16 | fp16 | fp32 | fp8 | int4 | int8
    #: the tensor whose presence says "this module is stored in this format"
    key: ClassVar[str] = "weight"
    optional: ClassVar[frozenset[str]] = frozenset({"bias"})

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
