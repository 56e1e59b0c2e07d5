"""Remaking an engine parameter that the engine created with the wrong shape or dtype.

Both engines have MoE methods whose parameters cannot hold the checkpoint bit for bit (packed
int32 zero points created as bf16, scales sized for the wrong rank); the adapters remake them
right after creation, keeping every attribute the engine's weight loaders rely on.
"""
from __future__ import annotations

import torch


def remake(layer: torch.nn.Module, name: str, shape: list[int], dtype: torch.dtype) -> None:
    """Replace `layer.<name>` with an empty parameter of `shape` / `dtype`, same attributes."""
    old = getattr(layer, name)
    new = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=old.device),
                             requires_grad=False)
    for attr, value in vars(old).items():   # weight_loader, quant_method, is_transposed, ...
        setattr(new, attr, value)
    layer.register_parameter(name, new)
