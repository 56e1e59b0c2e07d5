"""GPTQ int-N (AutoGPTQ/GPTQModel): qweight [in/pack, out], qzeros [groups, out/pack], scales, g_idx."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

from ..errors import ConfigError
from .base import (FLOAT_DTYPES, GroupSize, Parallel, ScaleDtype, WeightFormat, from_config,
                   int_in, pack_int, per_rank, stored_scale, unpack_int)

if TYPE_CHECKING:
    from torch import Tensor

INT32 = frozenset({"I32"})
# Marlin's smallest tiles (GPTQ_MARLIN_MIN_THREAD_N / _K); engines have no other int4 MoE kernel.
MARLIN_N, MARLIN_K = 64, 128
#: the widths Marlin (the engines' GPTQ / MoE int kernel) and `pack_int` both handle
MarlinBits = int_in(4, 8)


class PackedInt:
    """What every packed-int format (GPTQ, AWQ, compressed-tensors int) shares: `bits` packed
    32 // bits to an int32, one scale per `group_size` inputs (-1: one group), the same TP rules."""

    label_prefix: ClassVar[str]
    bits: int
    group_size: int

    @property
    def precision(self) -> str:
        return f"int{self.bits}"

    @property
    def pack(self) -> int:
        return 32 // self.bits

    def label(self) -> str:
        return f"{self.label_prefix}-int{self.bits}-g{self.group_size}"

    def groups(self, inp: int) -> int:
        return 1 if self.group_size == -1 else inp // self.group_size

    def tp_problems(self, out: int, inp: int, parallel: Parallel, tp: int) -> list[str]:
        problems = super().tp_problems(out, inp, parallel, tp)  # type: ignore[misc]
        return problems or int_tp_problems(self.label(), self.group_size, self.pack,
                                           out, inp, parallel, tp)


class Gptq(PackedInt, WeightFormat):
    label_prefix: ClassVar[str] = "gptq"
    name: ClassVar[str] = "gptq"
    key: ClassVar[str] = "qweight"
    optional: ClassVar[frozenset[str]] = frozenset({"bias", "g_idx"})
    bits: MarlinBits = 4
    group_size: GroupSize = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: Literal["gptq", "gptq_v2"] = "gptq"   # v1 stores zero-1
    default_scale_dtype: ClassVar[ScaleDtype] = "F16"        # AutoGPTQ / GPTQModel write F16

    @classmethod
    def from_quantization_config(cls, qc: dict[str, Any], file: object) -> list[WeightFormat]:
        # AutoGPTQ / GPTQModel spell every field as this model does
        return [from_config(cls, file, **{k: v for k, v in qc.items() if k in cls.model_fields})]

    def quantization_config(self, ignore: list[str]) -> dict | None:
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "sym": self.sym, "desc_act": self.desc_act, "checkpoint_format": self.checkpoint_format,
                "modules_to_not_convert": ignore}

    def logical_shape(self, key_shape: tuple[int, ...]) -> tuple[int, int]:
        rows, out = key_shape
        return out, rows * self.pack

    def tensor_shapes(self, out: int, inp: int) -> dict[str, tuple[int, ...]]:
        g = self.groups(inp)
        return {"qweight": (inp // self.pack, out), "qzeros": (g, out // self.pack),
                "scales": (g, out), "g_idx": (inp,)}

    def tensor_dtypes(self) -> dict[str, frozenset[str]]:
        return {"qweight": INT32, "qzeros": INT32, "scales": FLOAT_DTYPES, "g_idx": INT32,
                "bias": FLOAT_DTYPES}

    def shard_dim(self, suffix: str, parallel: Parallel) -> int | None:
        if parallel == "column":
            return {"qweight": 1, "qzeros": 1, "scales": 1, "bias": 0}.get(suffix)
        if parallel == "row":
            if self.group_size == -1 and suffix in ("qzeros", "scales"):
                return None   # one group spans the whole input: every rank keeps it
            return {"qweight": 0, "qzeros": 0, "scales": 0, "g_idx": 0}.get(suffix)
        return None

    @property
    def _zero_offset(self) -> int:
        # v1 (AutoGPTQ) stores zero-1 and every v1 kernel adds the 1 back; v2 stores the zero.
        return 1 if self.checkpoint_format == "gptq" else 0

    def quantize(self, w: Tensor, calib: Tensor | None = None,
                 scale_dtype: ScaleDtype | None = None) -> dict[str, Tensor]:
        """RTN, or GPTQ when `calib` activations are given (with act-order if desc_act)."""
        check_int_shape(self.label(), *w.shape, self.group_size, self.pack)
        r = quantize_int(w, self.bits, self.group_size, self.sym,
                         scale_dtype or self.default_scale_dtype, calib, act_order=self.desc_act,
                         # zero-1 must fit the unsigned field, so v1 can't store zero 0
                         min_zero=self._zero_offset)
        return {"qweight": pack_int(r.q.T, self.bits, dim=0),
                "qzeros": pack_int(r.zero.T - self._zero_offset, self.bits, dim=1),
                "scales": r.scale.T.contiguous(), "g_idx": r.g_idx}

    def dequantize(self, tensors: Mapping[str, Tensor]) -> Tensor:
        q = unpack_int(tensors["qweight"], self.bits, dim=0).T          # [out, in]
        zero = unpack_int(tensors["qzeros"], self.bits, dim=1).T + self._zero_offset
        g_idx = tensors.get("g_idx")
        if g_idx is None:
            g_idx = sequential_groups(q.shape[1], self.group_size, q.device)
        return dequantize_int(q, tensors["scales"].T, zero, g_idx)


class IntQuant(NamedTuple):
    """One weight quantized to unsigned ints: w[o, i] ~ (q[o, i] - zero[o, g]) * scale[o, g],
    g = g_idx[i]. Every int format stores these, each in its own layout."""
    q: Tensor        # int32 [out, in], in [0, 2**bits)
    scale: Tensor    # [out, groups], in the stored dtype
    zero: Tensor     # int32 [out, groups], in [0, 2**bits)
    g_idx: Tensor    # int32 [in]: the group of each input column


def check_int_shape(label: str, out: int, inp: int, group_size: int, pack: int) -> None:
    """Refuse a weight whose groups or packed words would not come out whole."""
    if group_size != -1 and inp % group_size:
        raise ConfigError(f"{label} can't store a {out}x{inp} weight: in_features {inp} is not "
                          f"a multiple of group {group_size}",
                          fix="pick a group size that divides every in_features (or -1)")
    if out % pack or inp % pack:
        raise ConfigError(f"{label} can't store a {out}x{inp} weight: both sizes must be "
                          f"multiples of the pack factor {pack}", fix="leave this module unquantized")


def sequential_groups(inp: int, group_size: int, device: "torch.device | str | None" = None) -> Tensor:
    """g_idx without act-order: column i is in group i // group_size."""
    import torch
    return (torch.arange(inp, dtype=torch.int32, device=device)
            // (inp if group_size == -1 else group_size))


def int_qparams(w: Tensor, bits: int, sym: bool, scale_dtype: ScaleDtype,
                min_zero: int = 0) -> tuple[Tensor, Tensor]:
    """Min-max scale and zero over the last dim of `w` (one group per row), AutoGPTQ's and
    compressed-tensors' convention: the range always includes 0; symmetric fixes the zero at
    2**(bits-1) and spans [-amax, amax] with 2**bits - 1 steps."""
    import torch
    maxq = 2**bits - 1
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    if sym:
        scale = stored_scale(torch.maximum(-lo, hi) * 2 / maxq, scale_dtype)
        return scale, torch.full_like(lo, 2 ** (bits - 1), dtype=torch.int32)
    scale = stored_scale((hi - lo) / maxq, scale_dtype)
    zero = (-lo / scale.float()).round().clamp(min_zero, maxq).to(torch.int32)
    return scale, zero


def _round_to_grid(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return (w / scale.float()).round().add(zero).clamp(0, 2**bits - 1)


def quantize_int(w: Tensor, bits: int, group_size: int, sym: bool, scale_dtype: ScaleDtype,
                 calib: Tensor | None = None, act_order: bool = False, min_zero: int = 0,
                 damp: float = 0.01) -> IntQuant:
    """Round-to-nearest per group, or GPTQ (Frantar et al. 2022) when `calib` [n, in] is given."""
    import torch
    out, inp = w.shape
    gs = inp if group_size == -1 else group_size
    if calib is not None:
        with _one_thread():
            return gptq(w, calib, bits, gs, sym, scale_dtype, act_order, min_zero, damp)
    groups = w.float().reshape(out, inp // gs, gs)
    scale, zero = int_qparams(groups, bits, sym, scale_dtype, min_zero)
    q = _round_to_grid(groups, scale[..., None], zero[..., None], bits)
    return IntQuant(q.reshape(out, inp).to(torch.int32), scale, zero,
                    sequential_groups(inp, gs, w.device))


@contextmanager
def _one_thread() -> Iterator[None]:
    """GPTQ is thousands of small sequential ops: with several threads, fork/join costs more than
    the work (a 512x256 layer on 2 busy cores: 2.4 s with 2 threads, 0.02 s with 1)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq(w: Tensor, calib: Tensor, bits: int, group_size: int, sym: bool,
         scale_dtype: ScaleDtype, act_order: bool = False, min_zero: int = 0,
         damp: float = 0.01) -> IntQuant:
    """GPTQ: quantize column by column and push each column's error onto the columns not yet
    quantized, weighted by the inverse Hessian of the layer's squared output error."""
    import torch
    out, inp = w.shape
    x = calib.reshape(-1, inp).float()
    h = 2 * x.T @ x / x.shape[0]                         # H = 2 X^T X (per token)
    W = w.float().clone()
    dead = h.diagonal() == 0                             # inputs that are always 0: any value works
    h[dead, dead] = 1
    W[:, dead] = 0
    # act-order: quantize the columns with the largest activations first, while most of the
    # other columns can still absorb their error; groups then follow that order (hence g_idx).
    perm = (torch.argsort(h.diagonal(), descending=True) if act_order
            else torch.arange(inp))
    W, h = W[:, perm], h[perm][:, perm]
    h += damp * h.diagonal().mean() * torch.eye(inp)     # dampening keeps H well conditioned
    # Row i of the upper Cholesky factor of H^-1 says how the columns after i absorb i's error.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty(out, inp, dtype=torch.int32)
    scales, zeros = [], []
    # One block per group: when a group starts, every earlier column's error is already in W,
    # so its scale is fitted to the weights it will really quantize.
    for g0 in range(0, inp, group_size):
        g1 = g0 + group_size
        scale, zero = int_qparams(W[:, g0:g1], bits, sym, scale_dtype, min_zero)
        s, z = scale.float(), zero.float()
        err = torch.empty(out, group_size)
        for i in range(g0, g1):
            qi = _round_to_grid(W[:, i], s, z, bits)
            q[:, i] = qi.to(torch.int32)
            err[:, i - g0] = (W[:, i] - (qi - z) * s) / u[i, i]
            W[:, i:g1] -= err[:, i - g0, None] * u[i, i:g1]
        W[:, g1:] -= err @ u[g0:g1, g1:]                 # the rest of the matrix, once per group
        scales.append(scale)
        zeros.append(zero)
    inverse = torch.argsort(perm)
    g_idx = (torch.arange(inp, dtype=torch.int32) // group_size)[inverse]
    return IntQuant(q[:, inverse], torch.stack(scales, 1), torch.stack(zeros, 1), g_idx)


def dequantize_int(q: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor) -> Tensor:
    """float32 [out, in] from unsigned q [out, in], scale / zero [out, groups] and g_idx [in]."""
    g = g_idx.long()
    return (q.float() - zero.float()[:, g]) * scale.float()[:, g]


def int_tp_problems(label: str, group: int, pack: int, out: int, inp: int,
                    parallel: Parallel, tp: int) -> list[str]:
    """Group, packing and Marlin-tile rules shared by every packed-int format."""
    o, i = per_rank(out, inp, parallel, tp)
    problems = []
    if group != -1 and i % group:
        problems.append(f"{label}: input per rank {inp}/{tp}={i} is not a multiple of group {group}")
    if o % pack:
        problems.append(f"{label}: output per rank {o} is not a multiple of the pack factor {pack}")
    if o % MARLIN_N or i % MARLIN_K:
        problems.append(f"{label}: shard {o}x{i} (out x in) does not fit Marlin tiles "
                        f"(out % {MARLIN_N}, in % {MARLIN_K})")
    return problems
