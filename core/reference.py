"""The transformers reference of a plan: the same model, every planned weight dequantized.

Engine outputs are compared with this (same greedy tokens, close logprobs), and the tiny
family's perplexities come from it. Reads exactly the planned tensors.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .plan import Plan

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def dequantized_weights(plan: Plan, dtype: "torch.dtype | None" = None) -> dict[str, "torch.Tensor"]:
    """Checkpoint name -> dequantized tensor for every planned module (float32 by default)."""
    import torch
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = defaultdict(list)
    for a in plan.assignments:
        for t in a.tensors.values():
            by_file[t.file].append(t.name)
    raw: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            raw.update({n: f.get_tensor(n) for n in names})
    out = {}
    for a in plan.assignments:
        tensors = {s: raw[t.name] for s, t in a.tensors.items()}
        w = a.format.dequantize(tensors) if a.module.linear else tensors["weight"].float()
        out[f"{a.module.name}.weight"] = w.to(dtype or torch.float32)
        if "bias" in tensors:
            out[f"{a.module.name}.bias"] = tensors["bias"].to(dtype or torch.float32)
    return out


def reference_model(plan: Plan, dtype: "torch.dtype | None" = None) -> "PreTrainedModel":
    """transformers' own model class for the base config, loaded with the dequantized plan."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    config: dict[str, Any] = dict(plan.sources[plan.config.base].config)
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="mixload-reference-") as tmp:
        # from_pretrained maps per-expert checkpoint names onto transformers 5's fused experts.
        save_file({k: v.contiguous() for k, v in dequantized_weights(plan, dtype).items()},
                  os.path.join(tmp, "model.safetensors"))
        Path(tmp, "config.json").write_text(json.dumps(config))
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
    return model.eval()


def perplexity(model: "PreTrainedModel", ids: "torch.Tensor", window: int = 128) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of a 1-D token tensor."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start:start + window + 1].unsqueeze(0)
            if chunk.numel() < 2:
                break
            logits = model(chunk[:, :-1]).logits.float()
            nll += torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), chunk[0, 1:], reduction="sum").item()
            count += chunk.numel() - 1
    return math.exp(nll / count)
