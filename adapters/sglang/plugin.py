"""SGLang plugin (entry point group `sglang.srt.plugins`) and mixload adapter hooks.

SGLang runs `register()` in its main process and in every scheduler / TP worker (load_plugins()).
It must be idempotent and import nothing from SGLang at module level, because the pluggy side
(`mixload_backend`, `mixload_serve`) is imported by the core without SGLang installed.

What it registers, through SGLang's public extension points where they exist:
- quantization method `mixload`: SGLang has no register call, so the class goes into
  QUANTIZATION_METHODS (and CPU_QUANTIZATION_METHODS, which AMX CPUs consult) and the name into
  the --quantization choices (`add_quantization_method_choices`);
- the mixed loader: an AROUND hook on `get_model_loader` (HookRegistry also rebinds every
  `from ... import get_model_loader`), taken when the model's quantization is `mixload`.
"""
from __future__ import annotations

import logging
from typing import Any

from mixload.core.hooks import hookimpl

logger = logging.getLogger(__name__)

BACKEND = "sglang"
NAME = "mixload"
LOADER_TARGET = "sglang.srt.model_loader.loader.get_model_loader"

_state = {"registered": False, "loader_class": None}


def register() -> None:
    """Make `--quantization mixload` and the mixed loader known to this SGLang process."""
    if _state["registered"]:
        return
    from sglang.srt.layers import quantization as q
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import add_quantization_method_choices, QUANTIZATION_CHOICES

    from .loader import make_loader_class
    from .quant_config import MixloadConfig

    q.QUANTIZATION_METHODS[NAME] = MixloadConfig
    q.BASE_QUANTIZATION_METHODS[NAME] = MixloadConfig
    q.CPU_QUANTIZATION_METHODS[NAME] = MixloadConfig
    if NAME not in QUANTIZATION_CHOICES:
        add_quantization_method_choices([NAME])
    _state["loader_class"] = make_loader_class()
    HookRegistry.register(LOADER_TARGET, _get_model_loader, HookType.AROUND)
    # Inside load_plugins() SGLang applies hooks right after; outside it (the launcher, tests)
    # nobody would, so apply now. Already-patched targets are skipped, so this is safe twice.
    HookRegistry.apply_hooks()
    _state["registered"] = True
    logger.info("mixload: quantization method and mixed model loader registered")


def _get_model_loader(original: Any, load_config: Any, model_config: Any = None) -> Any:
    """SGLang's get_model_loader, except that a mixload model gets the mixed loader.
    An explicit loader class (`load_format=<class>`) and dummy weights keep SGLang's choice."""
    fmt = getattr(load_config, "load_format", None)
    explicit = isinstance(fmt, type) or str(getattr(fmt, "value", fmt)) == "dummy"
    if not explicit and getattr(model_config, "quantization", None) == NAME:
        return loader_class()(load_config)
    return original(load_config, model_config)


def loader_class() -> type:
    """The SGLang model loader class for mixload (after register())."""
    register()
    return _state["loader_class"]  # type: ignore[return-value]


# ---- mixload adapter hooks (core/hooks.py)

@hookimpl
def mixload_backend() -> str:
    return BACKEND


@hookimpl
def mixload_serve(backend: str, argv: list[str]) -> int | None:
    """`mixload serve sglang <seed flags + SGLang flags>`."""
    if backend != BACKEND:
        return None
    from .launch import main
    return main(argv)
