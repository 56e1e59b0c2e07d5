"""A mixed model served by SGLang's own forward computes what the plan says.

Two BF16 checkpoints of one architecture with different weights (SGLang's CPU path runs no
quantized kernel): attention of layer 1 and the experts / MLP come from the second. The reference
is transformers on a merged copy holding exactly the planned tensors. Quantized mixes are checked
parameter by parameter in test_load.py; their kernels run on the GPU (tests/gpu/).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from sgl_fixtures import write_mix
from sgl_expected import planned_tensors
from sgl_forward import greedy
from safetensors.torch import save_file
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.model_loader.loader import get_model_loader
from transformers import AutoModelForCausalLM

from mixload.adapters.sglang.loader import Settings

PROMPT = [1, 5, 9, 33, 100, 7, 300, 42, 901, 17]
STEPS = 4
# max |logit difference| / max |logit| per step, measured (2 cores, torch 2.13.0+cpu): float32
# <= 3.9e-7, bfloat16 <= 7.7e-3 (bf16 rounding in another op order). A weight from the wrong
# source moves it by ~1 (asserted below).
TOLERANCE = {"float32": 2e-6, "bfloat16": 3e-2}


def reference_logits(plan, tmp_path, seq: list[int], dtype: torch.dtype) -> torch.Tensor:
    """transformers on a folder holding exactly the planned tensors (hub layout) + base config."""
    merged = tmp_path / "merged"
    merged.mkdir()
    save_file(planned_tensors(plan), str(merged / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(plan.sources[plan.config.base].path / "config.json", merged / "config.json")
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype).eval()
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch, second", [("qwen3-moe", "*.mlp.experts.*"), ("qwen3", "*.mlp.*")])
def test_forward_of_a_two_source_mix_matches_transformers(family, model_config, tmp_path, arch,
                                                          second, dtype):
    mix = write_mix(tmp_path / "mix.yaml", {"a": family[arch]["bf16"], "b": family[arch]["bf16b"]},
                    "a", [(second, "b"), ("model.layers.1.self_attn.*", "b")])
    mc = model_config(family[arch]["bf16"], dtype=dtype)
    loader = get_model_loader(LoadConfig(model_loader_extra_config=Settings(str(mix)).to_extra()), mc)
    model = loader.load_model(model_config=mc, device_config=DeviceConfig("cpu"))
    plan = loader.plan
    assert {a.source for a in plan.assignments} == {"a", "b"}

    seq, logits = greedy(model, mc.hf_config, mc.dtype, PROMPT, STEPS)
    ref = reference_logits(plan, tmp_path, seq, mc.dtype)[len(PROMPT) - 1:]
    for step, got in enumerate(logits):
        scale = float(ref[step].abs().max())
        assert float((got - ref[step]).abs().max()) <= TOLERANCE[dtype] * scale, step
        assert int(got.argmax()) == int(ref[step].argmax()), step   # same greedy token

    # ...and the mix mattered: the first source alone computes something else.
    only_a = AutoModelForCausalLM.from_pretrained(family[arch]["bf16"], dtype=mc.dtype).eval()
    with torch.no_grad():
        a_logits = only_a(torch.tensor([seq])).logits[0, len(PROMPT) - 1].float()
    assert float((a_logits - logits[0]).abs().max()) > 0.1 * float(a_logits.abs().max())
    (tmp_path / "forward.json").write_text(json.dumps({"seq": seq}))
