"""Helpers of the vLLM tests: tiny checkpoints, a vLLM model without an engine, greedy decoding
through vLLM and through the transformers reference of the same plan."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from mixload.core.config import load
from mixload.core.convert import convert
from mixload.core.plan import Plan, build_plan

TINY = {  # hidden 256, head_dim 128, 4 heads, 2 KV heads, 2 layers, vocab 1024
    "hidden_size": 256, "head_dim": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "vocab_size": 1024, "intermediate_size": 512,
    "max_position_embeddings": 512, "tie_word_embeddings": False}
TINY_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256}
# Prompts are token ids: the random tiny models have no tokenizer.
PROMPTS = [[1, 2, 3, 4], [100, 200, 300], [7] * 8, [512, 3, 900, 41, 17]]
MAX_TOKENS = 32
MAX_MODEL_LEN = 128


def tiny_checkpoint(arch: str, folder: Path, seed: int = 0) -> Path:
    """A random BF16 checkpoint of the tiny Qwen3 / Qwen3-MoE, written with transformers.

    lm_head is scaled up: a random model's next-token distribution is nearly flat, and greedy
    decoding through two implementations would part at the first near-tie."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**TINY))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY, **TINY_MOE))
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def family(root: Path, arch: str) -> dict[str, Path]:
    """The BF16 checkpoint, a second one (another seed) and its quantized siblings."""
    bf16 = tiny_checkpoint(arch, root / "bf16")
    out = {"bf16": bf16, "bf16-b": tiny_checkpoint(arch, root / "bf16-b", seed=1)}
    for name, to in (("gptq", "gptq-int4"), ("awq", "awq-int4"), ("fp8", "fp8")):
        out[name] = convert(bf16, root / name, to=to)
    return out


def write_mix(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def plan_of(mix: Path) -> Plan:
    return build_plan(load(mix))


# ---- vLLM

def engine_config(folder: Path, dtype: str = "bfloat16") -> Any:
    """The VllmConfig `LLM(folder, load_format="mixed")` would run with (plan included)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(str(folder), load_format="mixed", dtype=dtype, enforce_eager=True,
                      max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True).create_engine_config()


def fresh_model(config: Any) -> torch.nn.Module:
    """vLLM's model for a config, built with its quant methods as the loader builds it, with no
    weights loaded and no engine started (so no kernel runs: works on any CPU)."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (destroy_model_parallel, init_distributed_environment,
                                  initialize_model_parallel, model_parallel_is_initialized)
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_current_vllm_config(config), set_default_torch_dtype(config.model_config.dtype):
        init_distributed_environment(   # one process group of one, made once per process
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"file://{tempfile.mktemp(prefix='mixload-dist-')}")
        if model_parallel_is_initialized():
            destroy_model_parallel()    # groups depend on the model (MoE adds the EP group)
        initialize_model_parallel(1, 1)
        return initialize_model(vllm_config=config)


def greedy(llm: Any) -> list[tuple[list[int], list[float]]]:
    """(tokens, logprob of each) of greedy decoding of every prompt through vLLM."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=1, detokenize=False,
                            ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params,
                        use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


def reference_greedy(plan: Plan) -> list[tuple[list[int], list[float]]]:
    """The same through transformers, in float32, from the plan's dequantized weights."""
    from mixload.core.reference import reference_model

    model = reference_model(plan, torch.float32)
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            r = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False,
                               output_scores=True, return_dict_in_generate=True)
            tokens = r.sequences[0, len(p):].tolist()
            out.append((tokens, [float(torch.log_softmax(s.float(), -1)[0, t])
                                 for s, t in zip(r.scores, tokens)]))
    return out


def expected_param(plan: Plan, param: str, shape: torch.Size) -> torch.Tensor:
    """What an engine parameter must hold, built from the planned tensors alone: a fused
    linear's shards concatenated along the one dim that gives the parameter's shape; a MoE's
    w13_* / w2_* stacked per expert ([gate; up] and down)."""
    from safetensors import safe_open

    layer, _, local = param.rpartition(".")
    members = [a for a in plan.assignments if a.module.group == layer]

    def tensor(a: Any, suffix: str) -> torch.Tensor:
        t = a.tensors[suffix]
        with safe_open(str(t.file), framework="pt") as f:
            return f.get_tensor(t.name)

    if local.startswith(("w13_", "w2_")):
        part, suffix = local.split("_", 1)
        wanted = ("gate_proj", "up_proj") if part == "w13" else ("down_proj",)
        experts = sorted({a.module.expert for a in members})
        return torch.stack([_fuse([tensor(a, suffix) for w in wanted for a in members
                                   if a.module.expert == e and a.module.name.endswith(w)],
                                  shape[1:]) for e in experts])
    return _fuse([tensor(a, local) for a in members], shape)


def _fuse(parts: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0].reshape(shape)   # scalar scales may be stored as () or (1,)
    dims = [d for d in range(parts[0].dim()) if _cat_shape(parts, d) == tuple(shape)]
    assert len(dims) == 1, f"can't tell how {len(parts)} shards make {tuple(shape)}"
    return torch.cat(parts, dims[0])


def _cat_shape(parts: list[torch.Tensor], dim: int) -> tuple[int, ...] | None:
    """The shape torch.cat(parts, dim) would have (None if they don't fit together)."""
    rest = {p.shape[:dim] + p.shape[dim + 1:] for p in parts}
    if len(rest) != 1:
        return None
    first = tuple(parts[0].shape)
    return first[:dim] + (sum(p.shape[dim] for p in parts),) + first[dim + 1:]
