"""Header-only checkpoints: real safetensors headers, data left as holes (sparse files).

They let the planner, the checks and the memory report run at the real scale of Qwen3-30B-A3B or
Qwen3-235B-A22B with no disk used and nothing downloaded.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

from . import catalog
from .formats import DTYPE_BYTES, Unquantized, WeightFormat

QUANTIZED_KINDS = frozenset({"attention", "mlp", "experts"})
QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "vocab_size": 151936, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "torch_dtype": "bfloat16"}
QWEN3_235B_A22B: dict[str, Any] = {
    **QWEN3_30B_A3B, "hidden_size": 4096, "num_hidden_layers": 94, "num_attention_heads": 64,
    "intermediate_size": 12288, "moe_intermediate_size": 1536}


def _dtype_for(allowed: frozenset[str], scale_dtype: str) -> str:
    return scale_dtype if scale_dtype in allowed else sorted(allowed)[0]


def tensor_table(config: dict[str, Any], fmt: WeightFormat | None,
                 scale_dtype: str = "BF16") -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor a checkpoint of this model in `fmt` holds."""
    dtype = "F16" if config.get("torch_dtype") == "float16" else "BF16"
    table: dict[str, tuple[str, tuple[int, ...]]] = {}
    for m in catalog.modules(config):
        f = fmt if (fmt is not None and m.linear and m.kind in QUANTIZED_KINDS) else None
        if f is None:
            table[f"{m.name}.weight"] = (dtype, m.shape)
            continue
        allowed = f.tensor_dtypes()
        for suffix, shape in f.tensor_shapes(*m.shape).items():
            table[f"{m.name}.{suffix}"] = (_dtype_for(allowed[suffix], scale_dtype), shape)
    return table


def _header(entries: list[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, int]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dtype, shape in entries:
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), off


def write(folder: str | os.PathLike[str], config: dict[str, Any], fmt: WeightFormat | None = None,
          *, scale_dtype: str = "BF16", shard_bytes: int = 4 * 2**30) -> Path:
    """Write config.json, the index and sparse shards of a checkpoint; returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    table = tensor_table(config, fmt, scale_dtype)
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, (dtype, shape) in table.items():
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape))
        size += n
    weight_map = {}
    for i, entries in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        raw, data = _header(entries)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + data)   # a hole: no disk used for the data
        weight_map.update({name: fname for name, _, _ in entries})
    cfg = dict(config)
    ignore = [m.name for m in catalog.modules(config)
              if m.linear is False and m.kind in ("router", "lm_head")]
    if fmt is not None and not isinstance(fmt, Unquantized):
        cfg["quantization_config"] = fmt.quantization_config(ignore)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(_header(e)[1] for e in shards)},
                    "weight_map": weight_map}, indent=2))
    return out


def write_family(folder: str | os.PathLike[str], config: dict[str, Any],
                 formats: dict[str, WeightFormat | None]) -> dict[str, Path]:
    """Sibling checkpoints of one model, one per format, under `folder`/<name>."""
    return {name: write(Path(folder) / name, config, fmt) for name, fmt in formats.items()}


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="mixload-header-only-"))
