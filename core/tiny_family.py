"""The tiny model family's BF16 members: real, small, meaningful models made locally.

Tests and demos need checkpoints that load in transformers, vLLM and SGLang and whose greedy text
means something, without any download. So we train them here, deterministically, from the Python
docs that ship with the stdlib (`pydoc_data`): a 1024-token byte-level BPE and three 4-layer models
(Qwen3 dense, Qwen3-MoE, and a Qwen3-MoE whose first layer is dense) whose every linear dimension is a multiple of 128, so that FP8 block
128 and GPTQ/AWQ group 128 fit even at TP=2.

    path = ensure("qwen3-moe")        # <cache>/tiny/<hash12>/qwen3-moe-bf16, built on first use
    perplexity(path, corpus()[1])      # held-out quality

Folders are keyed by a hash of this file's source and the hyperparameters below, and appear
atomically (built in a temporary sibling, then renamed), so a crashed or racing build never
leaves a half folder that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import output
from .errors import OutputError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel

EOS = "<|endoftext|>"
VOCAB = 1024
HELD_OUT = 0.05  # the tail of the corpus, cut at a line break

# Shared by every architecture: head_dim 128 makes k/v out 2*128 = 256, i.e. 128 per rank at
# TP=2, so every linear dim (256, 512, 1024) is a multiple of the 128 block/group sizes.
ATTENTION = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=128, max_position_embeddings=512,
                 tie_word_embeddings=False, rope_theta=10000.0)

ARCHS: dict[str, dict[str, Any]] = {
    "qwen3": dict(ATTENTION, architectures=["Qwen3ForCausalLM"], intermediate_size=512),
    "qwen3-moe": dict(ATTENTION, architectures=["Qwen3MoeForCausalLM"],
                      # intermediate_size is unused (no dense layers) but config.json shows it:
                      # keep it a multiple of 128 too instead of the class default 6144.
                      intermediate_size=512, moe_intermediate_size=256, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[],
                      # Training only: 10x the published load-balancing weight, so that every
                      # expert gets tokens (with 0.001 some experts of a layer were never routed).
                      router_aux_loss_coef=0.01),
}
# Qwen3-MoE whose layer 0 is a dense MLP (`mlp_only_layers`, like DeepSeek's first dense layers):
# one model with attention, a dense MLP and experts, for mixes that give each its own precision.
ARCHS["qwen3-hybrid"] = dict(ARCHS["qwen3-moe"], mlp_only_layers=[0])

# Chosen by measurement on 2 idle CPU cores: batch 4 beat batch 8 at equal tokens and batch 2
# at equal time; learning rates of 3e-3 and up, and zero-initialised output layers, did worse.
# The MoE costs ~1.8x per token (routing, grouped matmuls), so it gets fewer steps; 450 instead
# of 500 cost it 12 points of perplexity.
TRAIN: dict[str, dict[str, Any]] = {
    "qwen3": dict(seed=0, steps=600, batch=4, seq_len=128, lr=2e-3, warmup=30, min_lr_frac=0.1,
                  weight_decay=0.1, betas=(0.9, 0.95), clip=1.0),
    "qwen3-moe": dict(seed=0, steps=500, batch=4, seq_len=128, lr=2e-3, warmup=25,
                      min_lr_frac=0.1, weight_decay=0.1, betas=(0.9, 0.95), clip=1.0),
}
TRAIN["qwen3-hybrid"] = TRAIN["qwen3-moe"]


def corpus() -> tuple[str, str]:
    """(train, held-out) text: the stdlib's pydoc topics, sorted by key, EOS between topics."""
    from pydoc_data.topics import topics

    text = EOS.join(topics[k].strip() for k in sorted(topics))
    cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_OUT)))
    return text[:cut], text[cut + 1:]


def train_tokenizer(text: str) -> "Tokenizer":
    """Byte-level BPE (GPT-2 style): any text encodes, nothing is ever unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return tok


def save_tokenizer(tok: "Tokenizer", folder: Path) -> None:
    """Written by hand rather than by transformers 5's save_pretrained, which names the class
    'TokenizersBackend' (unknown to the transformers 4.x that engines may run) and writes no
    special_tokens_map.json. PreTrainedTokenizerFast loads from these files everywhere."""
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
              "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def model_config(kind: str) -> Any:
    """The transformers config of one architecture, EOS as bos/eos/pad, BF16 on disk."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    spec = dict(ARCHS[kind])
    cls = Qwen3MoeConfig if is_moe(kind) else Qwen3Config
    rope_theta = spec.pop("rope_theta")
    return cls(**spec, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
               bos_token_id=0, eos_token_id=0, pad_token_id=0, dtype="bfloat16")


def is_moe(kind: str) -> bool:
    return "num_experts" in ARCHS[kind]


def train(kind: str, ids: "torch.Tensor") -> "PreTrainedModel":
    """A short deterministic AdamW run on random windows of `ids` (a fixed, seeded order).

    On the GPU machine it trains on the GPU (seconds instead of a minute of device time); its
    weights then differ from a CPU build's (as two CPU kinds' builds do), which is fine for a
    local cache."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    hp = TRAIN[kind]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(hp["seed"])
    # grouped_mm: the eager experts loop creates a new matmul shape per expert per step, which
    # was erratic (up to 10x slower) on CPU; batched_mm was ~60x slower.
    moe = is_moe(kind)
    extra = {"experts_implementation": "grouped_mm"} if moe else {}
    aux = {"output_router_logits": True} if moe else {}  # adds the load-balancing loss
    model = AutoModelForCausalLM.from_config(model_config(kind), dtype=torch.float32,
                                             attn_implementation="sdpa", **extra).to(device)
    model.train()
    # fused: one kernel over all parameters; the default per-tensor path took ~20% of an MoE
    # step (its 3-D expert tensors) on CPU.
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], betas=hp["betas"],
                            weight_decay=hp["weight_decay"], fused=True)
    steps, warmup, floor = hp["steps"], hp["warmup"], hp["min_lr_frac"]

    def lr_factor(step: int) -> float:  # linear warmup, cosine down to floor
        if step < warmup:
            return (step + 1) / warmup
        cos = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        return floor + (1 - floor) * cos

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(hp["seed"])
    T, B = hp["seq_len"], hp["batch"]
    # The first use of a `tiny:` source trains for minutes: show it (stderr; a bar on a terminal).
    for _ in tqdm(range(steps), desc=f"mixload: training the tiny {kind} (first use, cached)",
                  unit="step", mininterval=5, file=sys.stderr):
        starts = torch.randint(0, len(ids) - T, (B,), generator=gen)
        x = torch.stack([ids[s:s + T] for s in starts.tolist()]).to(device)
        # bf16 autocast on the GPU only: a CPU without native bf16 (AVX2-only) runs bf16 matmuls
        # ~50x slower than fp32 (avx512_bf16 gains only ~1.15x). The kernels of each CPU kind
        # round differently and training amplifies it: the weights differ by CPU kind, their
        # quality does not (tests/test_tiny_family.py pins the held-out perplexity).
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=x, labels=x, **aux).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return model.cpu().eval()


def fingerprint() -> str:
    """12 hex digits of this file's source and the hyperparameters: the cache key."""
    blob = json.dumps({"vocab": VOCAB, "held_out": HELD_OUT, "archs": ARCHS, "train": TRAIN},
                      sort_keys=True)
    return hashlib.sha256(Path(__file__).read_bytes() + blob.encode()).hexdigest()[:12]


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MIXLOAD_CACHE") or Path.home() / ".cache" / "mixload")


def _atomic(dest: Path, build: Callable[[Path], None]) -> Path:
    """`dest`, made by build(tmp) in a sibling temp folder then renamed into place (output.py).

    Of two racing builders the loser drops its copy and uses the winner's; `dest` existing
    means it is complete."""
    if dest.is_dir():
        return dest
    try:
        return output.write(dest, build, "mixload tiny_family", replace=False)
    except OutputError:
        if not dest.is_dir():
            raise
    return dest


def tokenizer_folder(cache_dir: Path | None = None) -> Path:
    """The family's tokenizer files, built once per fingerprint and shared by every model."""
    def build(tmp: Path) -> None:
        save_tokenizer(train_tokenizer(corpus()[0]), tmp)
    return _atomic(cache_root(cache_dir) / "tiny" / fingerprint() / "tokenizer", build)


def _build_model(kind: str, tok_dir: Path, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = torch.tensor(tok.encode(corpus()[0]).ids)
    model = train(kind, ids)
    model.to(torch.bfloat16).save_pretrained(out)
    _hub_spelling(out / "config.json", kind)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, out / name)


def _hub_spelling(path: Path, kind: str) -> None:
    """transformers 5 writes num_local_experts / rope_parameters / dtype; published Qwen3
    configs (and older readers in the engines) say num_experts / rope_theta / torch_dtype.
    transformers 5 reads both spellings, so write the published ones too."""
    cfg = json.loads(path.read_text())
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg["rope_theta"] = ARCHS[kind]["rope_theta"]
    cfg["torch_dtype"] = "bfloat16"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def ensure(kind: str, cache_dir: Path | None = None) -> Path:
    """The folder of the BF16 `kind` ('qwen3', 'qwen3-moe', 'qwen3-hybrid'), trained on first use."""
    if kind not in ARCHS:
        raise ValueError(f"unknown tiny model {kind!r}; known: {sorted(ARCHS)}")
    tok_dir = tokenizer_folder(cache_dir)
    return _atomic(tok_dir.parent / f"{kind}-bf16", lambda tmp: _build_model(kind, tok_dir, tmp))


def write_random(folder: Path, config: Any, seed: int = 0) -> dict[str, "torch.Tensor"]:
    """An untrained BF16 checkpoint of a transformers `config` (weights N(0, 0.05)), laid out
    like the hub's: one tensor per expert, `num_experts` in config.json. For tests that need
    several different checkpoints of one architecture in seconds. Returns what it wrote."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    sd = {k: (torch.randn(v.shape) * 0.05).to(torch.bfloat16) for k, v in model.state_dict().items()}
    # transformers 5 holds the experts of a layer as one fused 3-D parameter; hub files don't.
    for k in [k for k in sd if k.endswith("mlp.experts.gate_up_proj")]:
        pre = k.removesuffix("gate_up_proj")
        gate_up, down = sd.pop(k), sd.pop(pre + "down_proj")
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            sd[f"{pre}{e}.gate_proj.weight"] = gate_up[e, :inter].clone()
            sd[f"{pre}{e}.up_proj.weight"] = gate_up[e, inter:].clone()
            sd[f"{pre}{e}.down_proj.weight"] = down[e].clone()
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    if "num_local_experts" in cfg:   # transformers 5's spelling; hub configs say num_experts
        cfg["num_experts"] = cfg.pop("num_local_experts")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return sd


def perplexity(model_dir: Path, text: str, window: int = 128) -> float:
    """Held-out perplexity of a model folder on `text` (transformers, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .reference import perplexity as windowed

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return windowed(model, torch.tensor(tok(text, verbose=False)["input_ids"]), window)


def sibling(kind: str, to: str, cache_dir: Path | None = None) -> Path:
    """The BF16 `kind` converted with `mixload convert --to <to>` (fp8, gptq-int4, awq-int4,
    ...), made on first use next to it: the family of published checkpoints, in miniature."""
    from .convert import convert

    bf16 = ensure(kind, cache_dir)
    return _atomic(bf16.parent / f"{kind}-{to}", lambda tmp: convert(bf16, tmp, to, overwrite=True))


def resolve(spec: str, cache_dir: Path | None = None) -> Path:
    """`qwen3-moe` or `qwen3-moe/gptq-int4` (a mix YAML's `tiny:` source) -> its folder."""
    kind, _, to = spec.partition("/")
    return sibling(kind, to, cache_dir) if to and to != "bf16" else ensure(kind, cache_dir)


def build_all(cache_dir: Path | None = None) -> dict[str, Path]:
    """Every model (for manual runs): prints build time and held-out perplexity."""
    out = {}
    for kind in ARCHS:
        t0 = time.perf_counter()
        out[kind] = ensure(kind, cache_dir)
        ppl = perplexity(out[kind], corpus()[1])
        print(f"{kind}: {out[kind]}  {time.perf_counter() - t0:.1f}s  held-out ppl {ppl:.1f}")
    return out


if __name__ == "__main__":
    build_all()
