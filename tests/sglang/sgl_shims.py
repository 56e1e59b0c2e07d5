"""What SGLang 0.5.21 needs to run its model classes on a CPU-only box (measured recipe:
shared/engine-facts/sglang-cpu). Import this before anything imports sglang.

None of it changes what is tested: it stubs a vision package text models never call, keeps
RoPE on its native path, and tells Marlin it is on an sm90 card so that its *weights* can be
created and loaded (its kernels are never run here).
"""
from __future__ import annotations

import enum
import importlib
import importlib.machinery
import os
import sys
import tempfile
import types

os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="sgl-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _stub_torchvision() -> None:
    """PyPI's torchvision needs CUDA torch, so it is not installed; two sglang config modules
    import it at module level, and transformers must decide it is absent *before* the stub."""
    import transformers  # noqa: F401
    from transformers.utils import import_utils as iu

    iu.is_torchvision_available()
    iu.is_torchvision_greater_or_equal("0.0")
    auto = importlib.import_module("transformers.models.auto.image_processing_auto")
    sys.modules["transformers"].AutoImageProcessor = auto.AutoImageProcessor
    if "torchvision" in sys.modules:
        return

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    def unavailable(modname: str, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def fail(*a, **k):
            raise RuntimeError(f"torchvision stub: {modname}.{attr} is not available on CPU")
        return fail

    def module(name: str) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        m.__path__ = []
        m.__getattr__ = lambda attr, _n=name: unavailable(_n, attr)  # type: ignore[method-assign]
        sys.modules[name] = m
        return m

    tv = module("torchvision")
    tv.__version__ = "0.0.0+stub"
    for sub in ("transforms", "transforms.functional", "transforms.v2",
                "transforms.v2.functional", "io", "ops"):
        module(f"torchvision.{sub}")
    tv.transforms = sys.modules["torchvision.transforms"]
    for n in ("torchvision.transforms", "torchvision.transforms.functional",
              "torchvision.transforms.v2.functional"):
        sys.modules[n].InterpolationMode = InterpolationMode
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    sys.modules["torchvision.transforms"].v2 = sys.modules["torchvision.transforms.v2"]
    sys.modules["torchvision.transforms.v2"].functional = sys.modules["torchvision.transforms.v2.functional"]


def apply() -> None:
    _stub_torchvision()
    # Without SGLANG_USE_CPU_ENGINE (needs sgl_kernel's CPU build, on no index) RotaryEmbedding
    # would import vllm's custom ops; claim CPU so it keeps the native path.
    import sglang.srt.layers.rotary_embedding.base as rope
    rope._is_cpu = True
    # Marlin (GPTQ/AWQ) checks the CUDA capability, (None, None) on CPU: say sm90 so the
    # methods create their parameters. process_weights_after_loading still needs CUDA.
    import sglang.srt.layers.quantization.marlin_utils as marlin
    marlin.get_device_capability = lambda *a, **k: (9, 0)
