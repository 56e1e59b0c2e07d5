"""Fixtures of the SGLang tests: the tiny checkpoint family, mix YAMLs, and SGLang's process
state set up the way its scheduler does (conftest.py imports this only when SGLang is there)."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

# hidden 256, head_dim 128, 4 heads / 2 KV heads, 2 layers, vocab 1024, 8 experts top-2:
# every linear dim a multiple of 128, so FP8 blocks, GPTQ/AWQ groups and Marlin tiles fit.
COMMON = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, head_dim=128,
              num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False,
              max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
              bos_token_id=1, eos_token_id=2)
ARCH = {
    "qwen3-moe": dict(architectures=["Qwen3MoeForCausalLM"], num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=256, intermediate_size=512, decoder_sparse_step=1,
                      mlp_only_layers=[], norm_topk_prob=True),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], intermediate_size=512),
}
# Layer 0 dense (mlp_only_layers), like the tiny family's qwen3-hybrid: not in `family`.
HYBRID = dict(ARCH["qwen3-moe"], mlp_only_layers=[0])
QUANTIZED = {"fp8": "fp8", "gptq": "gptq-int4", "awq": "awq-int4"}


def _write_bf16(folder: Path, arch: str, seed: int) -> Path:
    """A random BF16 checkpoint laid out like the hub's (one tensor per expert)."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    from mixload.core.tiny_family import write_random

    spec = HYBRID if arch == "qwen3-hybrid" else ARCH[arch]
    cls = Qwen3MoeConfig if "num_experts" in spec else Qwen3Config
    write_random(folder, cls(**COMMON, **spec, torch_dtype="bfloat16"), seed)
    return folder


def bf16_checkpoint(root: Path, arch: str, seed: int = 0) -> Path:
    """A random tiny checkpoint. (`mixload.core.tiny_family.ensure(arch)` — trained, meaningful
    text — replaces the seed-0 one once it lands; the tests do not depend on the layer count.)"""
    return _write_bf16(root / f"{arch}-bf16-seed{seed}", arch, seed)


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """{arch: {"bf16", "bf16b", "fp8", "gptq", "awq": folder}}: a BF16 checkpoint, a second one
    with other random weights, and its FP8 / GPTQ-int4 / AWQ-int4 siblings (mixload convert)."""
    from mixload.core.convert import convert

    root = tmp_path_factory.mktemp("tiny")
    out: dict[str, dict[str, Path]] = {}
    for arch in ARCH:
        bf16 = bf16_checkpoint(root, arch)
        out[arch] = {"bf16": bf16, "bf16b": bf16_checkpoint(root, arch, seed=1)}
        for key, to in QUANTIZED.items():
            out[arch][key] = convert(bf16, root / f"{arch}-{key}", to)
    return out


def write_mix(path: Path, sources: dict[str, Path], base: str, rules: list[tuple[str, str]],
              **extra: Any) -> Path:
    """A rule-form mix YAML."""
    doc = {"sources": {k: str(v) for k, v in sources.items()}, "base": base,
           "rules": [{"match": m, "use": u} for m, u in rules], **extra}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---- SGLang's process state, set up the way its scheduler does (gloo world of one)

_DIST = {"ready": False}


def _ensure_world() -> None:
    """A gloo world of one and the model-parallel groups, once per process (after the server
    args are published: the groups read their sizes from them)."""
    from sglang.srt.distributed.parallel_state import (init_distributed_environment,
                                                       initialize_model_parallel)
    if not _DIST["ready"]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel()
        _DIST["ready"] = True


@pytest.fixture
def model_config():
    """model_config(path, quantization="mixload", dtype="bfloat16") -> SGLang's ModelConfig,
    with server args published for that model as the scheduler would."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.dp_attention import init_dp_gathered_buffer, initialize_dp_attention
    from sglang.srt.layers.moe import initialize_moe_config
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    from mixload.adapters.sglang import plugin

    plugin.register()

    def make(path: Path, quantization: str | None = "mixload", dtype: str = "bfloat16"):
        sa = ServerArgs(model_path=str(path), device="cpu", tp_size=1, dtype=dtype,
                        quantization=quantization, attention_backend="torch_native",
                        skip_tokenizer_init=True, disable_cuda_graph=True)
        publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0))
        initialize_moe_config()
        _ensure_world()
        mc = ModelConfig(model_path=str(path), dtype=dtype, quantization=quantization)
        initialize_dp_attention(sa)
        init_dp_gathered_buffer(mc)
        return mc
    return make
