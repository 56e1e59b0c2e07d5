"""The logical modules of a model and their fused groups, from its config.json.

A new architecture is one line in ARCHITECTURES if it reuses these building blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from .errors import SourceError

Kind = Literal["attention", "mlp", "experts", "router", "norm", "embedding", "lm_head"]
Parallel = Literal["column", "row", "replicated", "vocab"]


class Module(NamedTuple):
    """One logical module (a tuple: a 235B MoE has 37k of them)."""

    name: str                 # checkpoint prefix, e.g. model.layers.0.self_attn.q_proj
    kind: Kind
    layer: int | None
    shape: tuple[int, ...]    # linear: (out, in); norm: (n,); embedding / lm_head: (vocab, hidden)
    parallel: Parallel
    group: str                # modules of one group share one quant method in the engines
    linear: bool = True       # may be quantized
    heads: int | None = None  # k/v: KV heads, replicated by the engines when TP > heads
    expert: int | None = None


@dataclass(frozen=True)
class Arch:
    attention: Literal["llama", "qwen3"]   # qwen3 adds per-head q_norm / k_norm
    mlp: Literal["dense", "moe"]


ARCHITECTURES: dict[str, Arch] = {
    "LlamaForCausalLM": Arch("llama", "dense"),
    "MistralForCausalLM": Arch("llama", "dense"),
    "Qwen2ForCausalLM": Arch("llama", "dense"),
    "Qwen3ForCausalLM": Arch("qwen3", "dense"),
    "Qwen3MoeForCausalLM": Arch("qwen3", "moe"),
}
# What must agree between every source of one mix.
ARCH_KEYS = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
             "num_experts", "num_experts_per_tok", "moe_intermediate_size",
             "tie_word_embeddings", "mlp_only_layers", "decoder_sparse_step")


def arch_of(config: dict[str, Any], file: object = None) -> Arch:
    names = config.get("architectures") or []
    for n in names:
        if n in ARCHITECTURES:
            return ARCHITECTURES[n]
    raise SourceError(f"architecture {names} is not supported", file=file,
                      fix=f"supported: {', '.join(ARCHITECTURES)} (add a line to catalog.ARCHITECTURES)")


def _attention(p: str, i: int, c: dict[str, Any], arch: Arch) -> list[Module]:
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or hidden // heads
    g = f"{p}.self_attn.qkv_proj"
    mods = [Module(f"{p}.self_attn.q_proj", "attention", i, (heads * hd, hidden), "column", g),
            Module(f"{p}.self_attn.k_proj", "attention", i, (kv * hd, hidden), "column", g, heads=kv),
            Module(f"{p}.self_attn.v_proj", "attention", i, (kv * hd, hidden), "column", g, heads=kv),
            Module(f"{p}.self_attn.o_proj", "attention", i, (hidden, heads * hd), "row",
                   f"{p}.self_attn.o_proj")]
    if arch.attention == "qwen3":
        mods += [_norm(f"{p}.self_attn.q_norm", i, hd), _norm(f"{p}.self_attn.k_norm", i, hd)]
    return mods


def _mlp(prefix: str, i: int, hidden: int, inter: int, kind: Kind, group: str,
         expert: int | None = None) -> list[Module]:
    return [Module(f"{prefix}.gate_proj", kind, i, (inter, hidden), "column", group, expert=expert),
            Module(f"{prefix}.up_proj", kind, i, (inter, hidden), "column", group, expert=expert),
            Module(f"{prefix}.down_proj", kind, i, (hidden, inter), "row",
                   group if kind == "experts" else f"{prefix}.down_proj", expert=expert)]


def _norm(name: str, layer: int | None, n: int) -> Module:
    return Module(name, "norm", layer, (n,), "replicated", name, linear=False)


def num_experts(c: dict[str, Any]) -> int:
    """transformers 5 writes `num_local_experts` where the hub's Qwen3-MoE configs say `num_experts`."""
    return c.get("num_experts") or c.get("num_local_experts") or 0


def is_moe_layer(c: dict[str, Any], i: int) -> bool:
    step = c.get("decoder_sparse_step") or 1
    return (num_experts(c) > 0 and i not in (c.get("mlp_only_layers") or [])
            and (i + 1) % step == 0)


def modules(config: dict[str, Any], file: object = None) -> list[Module]:
    """Every logical module of the model, in checkpoint order."""
    arch = arch_of(config, file)
    c = config
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if not isinstance(c.get(k), int)]
    if missing:
        raise SourceError(f"config.json lacks {missing}", file=file)
    hidden, vocab = c["hidden_size"], c["vocab_size"]
    mods = [Module("model.embed_tokens", "embedding", None, (vocab, hidden), "vocab",
                   "model.embed_tokens", linear=False)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        mods.append(_norm(f"{p}.input_layernorm", i, hidden))
        mods += _attention(p, i, c, arch)
        mods.append(_norm(f"{p}.post_attention_layernorm", i, hidden))
        if arch.mlp == "moe" and is_moe_layer(c, i):
            n = num_experts(c)
            mods.append(Module(f"{p}.mlp.gate", "router", i, (n, hidden), "replicated",
                               f"{p}.mlp.gate", linear=False))
            for e in range(n):
                mods += _mlp(f"{p}.mlp.experts.{e}", i, hidden, c["moe_intermediate_size"],
                             "experts", f"{p}.mlp.experts", expert=e)
        else:
            mods += _mlp(f"{p}.mlp", i, hidden, c["intermediate_size"], "mlp", f"{p}.mlp.gate_up_proj")
    mods.append(_norm("model.norm", None, hidden))
    if not c.get("tie_word_embeddings", False):
        # lm_head stays in the engines' unquantized path (ParallelLMHead), like the embedding.
        mods.append(Module("lm_head", "lm_head", None, (vocab, hidden), "vocab", "lm_head",
                           linear=False))
    return mods
