"""Helpers of the vLLM tests: tiny checkpoints, a vLLM model without an engine, greedy decoding
through vLLM and through the transformers reference of the same plan."""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mixload.core.build import build
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
#: top-1 logprob tolerance against the float32 reference, vLLM running in float16
#: (measured on the tiny models: <= 0.006; bf16 decoding differs by ~0.05 and parts at ties)
LOGPROB_TOL = 0.02
ENGINE_DTYPE = "float16"


def _int4_linear_kernel() -> bool:
    """vLLM's CPU int4 linears (GPTQ, AWQ) run its cpu_gemm_wna16 op, which only its AVX-512
    builds have; an AVX2-only CPU loads the AVX2 build and fails at the first forward."""
    import vllm._custom_ops  # noqa: F401  (loads vLLM's _C ops)
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


needs_int4_linear = pytest.mark.skipif(
    not _int4_linear_kernel(), reason="this CPU has no vLLM int4 linear kernel (cpu_gemm_wna16 "
                                      "is in vLLM's AVX-512 builds only)")


def tiny_checkpoint(arch: str, folder: Path, seed: int = 0) -> Path:
    """A random BF16 checkpoint of the tiny Qwen3 / Qwen3-MoE, written with transformers.

    lm_head is scaled up: a random model's next-token distribution is nearly flat, and greedy
    decoding through two implementations would part at the first near-tie."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**TINY))
    else:   # "qwen3-hybrid": layer 0 is a dense MLP, as in the tiny family's member
        dense = [0] if arch == "qwen3-hybrid" else []
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY, **TINY_MOE, mlp_only_layers=dense))
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


def fill(template: Any, paths: dict[str, Path]) -> Any:
    """A mix template with "{bf16}"-style placeholders replaced by checkpoint paths."""
    if isinstance(template, dict):
        return {k: fill(v, paths) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, paths) for v in template]
    return template.format(**{k: str(v) for k, v in paths.items()}) if isinstance(
        template, str) else template


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


@contextmanager
def engine_context(config: Any) -> Iterator[None]:
    """What a vLLM worker holds while it builds and loads a model: the config, the default
    dtype and one process group of one (made once per process)."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (destroy_model_parallel, init_distributed_environment,
                                  initialize_model_parallel, model_parallel_is_initialized)
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_current_vllm_config(config), set_default_torch_dtype(config.model_config.dtype):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"file://{tempfile.mktemp(prefix='mixload-dist-')}")
        if model_parallel_is_initialized():
            destroy_model_parallel()    # groups depend on the model (MoE adds the EP group)
        initialize_model_parallel(1, 1)
        yield


def fresh_model(config: Any) -> torch.nn.Module:
    """vLLM's model for a config, built with its quant methods as the loader builds it, with no
    weights loaded and no engine started (so no kernel runs: works on any CPU)."""
    from vllm.model_executor.model_loader.utils import initialize_model

    with engine_context(config):
        return initialize_model(vllm_config=config)


def start(folder: Path, **engine_args: Any) -> Any:
    """`LLM(folder, load_format="mixed")`: the way a user serves a built folder."""
    from vllm import LLM

    return LLM(str(folder), load_format="mixed", dtype=ENGINE_DTYPE, enforce_eager=True,
               max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True, seed=0, **engine_args)


def stop(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


def serve(doc: dict[str, Any], paths: dict[str, Path], tmp: Path,
          name: str = "mix.yaml") -> Iterator[tuple[Any, Plan]]:
    """A module fixture's body: the mix written, built and served, stopped afterwards (one
    engine per test module: a start costs ~15 s)."""
    mix = write_mix(tmp / name, fill(doc, paths))
    llm = start(build(mix, tmp / "model"))
    yield llm, plan_of(mix)
    stop(llm)


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


def assert_greedy_matches_reference(got: list[tuple[list[int], list[float]]], plan: Plan,
                                    prompts: list[list[int]] = PROMPTS) -> None:
    """vLLM's greedy tokens are the reference's: transformers, in float32, running the plan's
    dequantized weights over the same prefix (teacher-forced on vLLM's tokens).

    At every step vLLM's token must be the reference's top-1 and its logprob within
    LOGPROB_TOL of the reference's. The one exception is a near-tie, where the reference's own
    top two are within LOGPROB_TOL and float rounding picks the winner: then vLLM's token must
    be the other of the two. Near-ties must stay rare, or the model would prove nothing."""
    from mixload.core.reference import reference_model

    model = reference_model(plan, torch.float32)
    steps = ties = 0
    for prompt, (tokens, logprobs) in zip(prompts, got, strict=True):
        assert len(tokens) == MAX_TOKENS, f"prompt {prompt}: {len(tokens)} tokens"
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits.float(), -1)
        top = ref.topk(2)
        for i, (token, logprob) in enumerate(zip(tokens, logprobs)):
            where = f"prompt {prompt}, token {i}"
            gap = float(top.values[i, 0] - top.values[i, 1])
            ties += gap <= LOGPROB_TOL
            if token != int(top.indices[i, 0]):
                assert gap <= LOGPROB_TOL and token == int(top.indices[i, 1]), (
                    f"{where}: vLLM chose {token}, the reference {int(top.indices[i, 0])} "
                    f"by a logprob margin of {gap:.4f}")
            assert abs(logprob - float(ref[i, token])) <= LOGPROB_TOL, (
                f"{where}: logprob {logprob:.4f}, reference {float(ref[i, token]):.4f}")
            steps += 1
    assert ties * 10 <= steps, f"{ties} of {steps} steps are near-ties: the model is too flat"


def assert_report(report: Any, plan: Plan) -> None:
    """Read exactly the planned tensors, each file once; hold exactly them, less what carries no
    information (vLLM 0.30 drops GPTQ's sequential g_idx)."""
    files = {t.file for a in plan.assignments for t in a.tensors.values()}
    assert report.read_bytes == report.planned_bytes == sum(a.nbytes for a in plan.assignments)
    assert report.files_opened == len(files)
    assert report.param_bytes == report.planned_bytes - report.redundant_bytes


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
