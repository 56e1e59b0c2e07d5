"""vLLM plugin entry point (`vllm.general_plugins`) and mixload's adapter hooks.

vLLM calls `register()` once in every process it starts (front end, engine core, workers), so it
is idempotent and cheap (its imports are the modules vLLM imports anyway to load a quantized
model; measured 0.05 s of its own), and this module imports without vLLM installed: vLLM is
imported only inside `register()`.
"""
from __future__ import annotations

from mixload.core.hooks import hookimpl

BACKEND = "vllm"


def register() -> None:
    """Register the "mixload" quantization config and the "mixed" load format with vLLM.

    Both register through decorators that run when their module is first imported; Python
    imports a module once per process, which makes this idempotent."""
    from . import loader, quant_config  # noqa: F401


@hookimpl
def mixload_backend() -> str:
    return BACKEND
