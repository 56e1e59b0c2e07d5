"""GPTQ int-N (AutoGPTQ/GPTQModel): qweight [in/pack, out], qzeros [groups, out/pack], scales, g_idx."""
from __future__ import annotations

from typing import ClassVar, Literal

from .base import FLOAT_DTYPES, Parallel, WeightFormat, per_rank

INT32 = frozenset({"I32"})
# Marlin's smallest tiles (GPTQ_MARLIN_MIN_THREAD_N / _K); engines have no other int4 MoE kernel.
MARLIN_N, MARLIN_K = 64, 128


class Gptq(WeightFormat):
    name: ClassVar[str] = "gptq"
    key: ClassVar[str] = "qweight"
    optional: ClassVar[frozenset[str]] = frozenset({"bias", "g_idx"})
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: Literal["gptq", "gptq_v2"] = "gptq"   # v1 stores zero-1

    @property
    def precision(self) -> str:  # type: ignore[override]
        return f"int{self.bits}"

    @property
    def pack(self) -> int:
        return 32 // self.bits

    def label(self) -> str:
        return f"gptq-int{self.bits}-g{self.group_size}"

    def quantization_config(self, ignore: list[str]) -> dict | None:
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "sym": self.sym, "desc_act": self.desc_act, "checkpoint_format": self.checkpoint_format,
                "modules_to_not_convert": ignore}

    def groups(self, inp: int) -> int:
        return 1 if self.group_size == -1 else inp // self.group_size

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

    def tp_problems(self, out: int, inp: int, parallel: Parallel, tp: int) -> list[str]:
        problems = super().tp_problems(out, inp, parallel, tp)
        if problems:
            return problems
        return int_tp_problems(self.label(), self.group_size, self.pack, out, inp, parallel, tp)


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
