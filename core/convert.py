"""Convert a BF16/FP16 checkpoint into one quantized format: `mixload convert`.

Streams tensor by tensor (memory: about twice the largest tensor), quantizes the linear modules
the catalog names (attention, dense MLP, experts), keeps everything else (router gates, norms,
embeddings, lm_head) as the source stores it, and writes a checkpoint that vLLM, SGLang and
`open_source` read like a published one. The output appears only once complete.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from . import output
from .catalog import Module, modules
from .errors import ConfigError, MixloadError, SourceError
from .formats import Awq, CtFp8, CtInt4, Fp8, Gptq, WeightFormat
from .formats.base import ScaleDtype, safetensors_dtype
from .sources import INDEX, Source, open_source

if TYPE_CHECKING:
    from torch import Tensor

TARGETS: dict[str, Callable[[int], WeightFormat]] = {
    "fp8": lambda g: Fp8(strategy="block", block=(128, 128)),      # Qwen3-FP8 / DeepSeek-V3 style
    "gptq-int4": lambda g: Gptq(bits=4, group_size=g),              # sym, no act-order, v1
    "awq-int4": lambda g: Awq(bits=4, group_size=g),
    "ct-int4": lambda g: CtInt4(bits=4, group_size=g),              # llm-compressor W4A16
    "ct-fp8": lambda g: CtFp8(strategy="channel", block=None),     # llm-compressor FP8_DYNAMIC
}
QUANTIZED_KINDS = frozenset({"attention", "mlp", "experts"})
SIDE_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "chat_template*", "generation_config.json")
MAX_SHARD_BYTES = 4 * 2**30
CALIB_TOKENS = 512   # one forward pass over this many tokens of the calibration text
REPORT = "mixload-convert.json"


def target_format(to: str, group_size: int = 128) -> WeightFormat:
    """The format a `convert --to` name stands for."""
    if to not in TARGETS:
        raise ConfigError(f"unknown conversion target {to!r}", fix=f"use one of {', '.join(TARGETS)}")
    if group_size == 0 or group_size < -1:
        raise ConfigError(f"group size {group_size} is not a number of input columns",
                          fix="use a positive group size (e.g. 128, --group 128) or -1 "
                              "for one scale per output channel")
    return TARGETS[to](group_size)


def convert(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], to: str,
            group_size: int = 128, calib: str | os.PathLike[str] | None = None,
            overwrite: bool = False, scale_dtype: ScaleDtype | None = None, *,
            max_shard_bytes: int = MAX_SHARD_BYTES, device: str | None = None) -> Path:
    """Write `src_dir` quantized to `to` into `out_dir` and print how far each kind of module
    moved (relative weight error ||W - deq(q(W))|| / ||W||, also in out_dir/mixload-convert.json).

    `calib`: a text file; GPTQ-style error compensation then uses the activations the source
    model produces on it (int4 targets only; experts stay RTN, see `_activations`). This loads
    the whole model in transformers, so memory is then the model's size, not a tensor's.
    `scale_dtype`: F32, BF16 or F16 (default: the format's convention).
    `device`: where to quantize ("cuda": minutes instead of a quarter hour for a real-width
    MoE; the output is the same up to float rounding).
    """
    fmt = target_format(to, group_size)
    src = open_source("source", src_dir)
    if src.formats:
        raise SourceError(f"the source is already quantized ({src.formats[0].label()})",
                          file=src.path, fix="convert from the bf16/fp16 checkpoint")
    out = output.guard(out_dir, output.source_folders(src), overwrite)
    mods = modules(src.config, src.path / "config.json")
    linear = {f"{m.name}.weight": m for m in mods if m.kind in QUANTIZED_KINDS}
    missing = sorted(set(linear) - set(src.tensors))
    if missing:
        raise SourceError(f"{len(missing)} linear weights the config implies are not in the "
                          f"checkpoint, e.g. {missing[0]}", file=src.path,
                          fix="check that config.json matches the weights (for MoE: num_experts)")
    # Router gates and lm_head are linear layers the engines must leave unquantized.
    ignore = [m.name for m in mods if m.kind == "router"] + ["lm_head"]
    acts = _activations(src, Path(calib), fmt, linear) if calib is not None else {}

    errors: dict[str, float] = {}

    def fill(tmp: Path) -> None:
        errors.update(_write_weights(src, tmp, fmt, linear, acts, scale_dtype, max_shard_bytes,
                                     device))
        config = dict(src.config)
        # GPTQ/AWQ exports conventionally say float16; we keep the source's dtype, because the
        # unquantized tensors stay in it and vLLM/SGLang run the model in `torch_dtype`
        # (they cast scales to it on load).
        config["quantization_config"] = fmt.quantization_config(ignore)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for pattern in SIDE_FILES:
            for f in src.path.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        (tmp / REPORT).write_text(json.dumps({
            "source": str(src.path), "format": fmt.label(), "scale_dtype": scale_dtype,
            "calibration": str(calib) if calib is not None else None,
            "calibrated": sorted(acts), "relative_error": errors}, indent=2) + "\n")

    output.write(out, fill, "mixload convert")
    print(summary(errors, linear, fmt, out, ignore, calibrated=len(acts)))
    return out


def relative_error(w: Tensor, approx: Tensor) -> float:
    """||w - approx|| / ||w|| (0 for an all-zero w that came back exactly)."""
    w = w.float()
    norm = float(w.norm())
    diff = float((w - approx.float()).norm())
    return diff / norm if norm else diff


def _write_weights(src: Source, folder: Path, fmt: WeightFormat, linear: dict[str, Module],
                   acts: dict[str, Tensor], scale_dtype: ScaleDtype | None,
                   max_shard_bytes: int, device: str | None = None) -> dict[str, float]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, info in sorted(src.tensors.items(), key=lambda kv: (kv[1].file, kv[1].begin)):
        by_file[info.file].append(name)
    writer = ShardWriter(folder, max_shard_bytes)
    errors: dict[str, float] = {}
    with tqdm(total=len(src.tensors), unit="tensor", desc=f"convert to {fmt.label()}") as bar:
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    t = f.get_tensor(name)
                    m = linear.get(name)
                    if m is None:
                        writer.add(name, t)
                    else:
                        w = t.to(device) if device else t
                        try:
                            q = fmt.quantize(w, acts.get(m.name), scale_dtype)
                        except MixloadError as exc:
                            raise ConfigError(exc.what, file=file, tensor=name, fix=exc.fix) from None
                        errors[m.name] = relative_error(w, fmt.dequantize(q))
                        for suffix, qt in q.items():
                            writer.add(f"{m.name}.{suffix}", qt.cpu())
                    bar.update()
    weight_map = writer.close()
    index = {"metadata": {"total_size": writer.total_bytes}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return errors


def summary(errors: dict[str, float], linear: dict[str, Module], fmt: WeightFormat, out: Path,
            ignore: list[str], calibrated: int = 0) -> str:
    """A few lines: modules quantized, and mean / max relative weight error per kind."""
    kinds: dict[str, list[float]] = defaultdict(list)
    for m in linear.values():
        kinds[m.kind].append(errors[m.name])
    how = f"GPTQ on {calibrated}, RTN on the rest" if calibrated else "round-to-nearest"
    lines = [f"converted to {fmt.label()}: {out}",
             f"  {len(errors)} linear modules quantized ({how}); router gates, lm_head, norms "
             f"and embeddings kept as in the source (ignore list: {len(ignore)} modules)"]
    for kind, errs in sorted(kinds.items()):
        lines.append(f"  {kind:<10} {len(errs):>5} modules  relative weight error "
                     f"mean {sum(errs) / len(errs):.4f}  max {max(errs):.4f}")
    if errors:
        worst = max(errors, key=errors.__getitem__)
        lines.append(f"  worst: {worst} ({errors[worst]:.4f})")
    return "\n".join(lines)


# ---- safetensors, written tensor by tensor

class ShardWriter:
    """Writes safetensors shards of at most `max_bytes` of data (one tensor may exceed it).

    The format puts a header with every tensor's offsets first, but those are known only when a
    shard is full. Tensor bytes therefore go to a side file as they come, and closing a shard
    writes header + data: memory holds one tensor, never a shard.
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.total_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._header: dict[str, Any] = {}
        self._data: Any = None
        self._size = 0

    def add(self, name: str, t: Tensor) -> None:
        import torch
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._data is not None and self._size + data.nbytes > self.max_bytes:
            self._finish_shard()
        if self._data is None:
            self._data = open(self.folder / f".shard-{len(self._shards)}.data", "wb")
            self._header, self._size = {}, 0
        self._header[name] = {"dtype": safetensors_dtype(t.dtype),
                              "shape": list(t.shape),
                              "data_offsets": [self._size, self._size + data.nbytes]}
        self._data.write(data.tobytes())
        self._size += data.nbytes
        self.total_bytes += data.nbytes

    def _finish_shard(self) -> None:
        data_path = Path(self._data.name)
        self._data.close()
        self._data = None
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)          # data starts 8-byte aligned
        shard = data_path.with_suffix(".safetensors")
        with open(shard, "wb") as f, open(data_path, "rb") as d:
            f.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(d, f, 16 * 2**20)
        data_path.unlink()
        self._shards.append((shard, list(self._header)))

    def close(self) -> dict[str, str]:
        """Finish the last shard, give the shards their final names; returns the weight map."""
        if self._data is not None:
            self._finish_shard()
        n = len(self._shards)
        weight_map = {}
        for i, (path, names) in enumerate(self._shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        return dict(sorted(weight_map.items()))


# ---- calibration

def _activations(src: Source, text_file: Path, fmt: WeightFormat,
                 linear: dict[str, Module]) -> dict[str, Tensor]:
    """The input [tokens, in] of every quantized attention / dense-MLP linear, from one forward
    pass of the source model (transformers) over the first CALIB_TOKENS tokens of the text.

    Experts get none and stay RTN: transformers 5 holds all experts of a layer as one 3-D
    parameter (no per-expert nn.Linear to hook), and each expert sees only its routed tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(fmt, (Gptq, Awq, CtInt4)):
        raise ConfigError(f"calibration is for int4 targets; {fmt.label()} does not use it",
                          fix="drop calib, or convert to gptq-int4 / awq-int4 / ct-int4")
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"can't read the calibration text: {exc}", file=text_file) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.path)
    except (OSError, ValueError) as exc:
        raise SourceError(f"can't load the tokenizer for calibration: {exc}", file=src.path,
                          fix="put the tokenizer files next to config.json") from None
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :CALIB_TOKENS]
    if ids.numel() == 0:
        raise ConfigError("the calibration text is empty", file=text_file)
    model = AutoModelForCausalLM.from_pretrained(src.path, dtype="auto")
    wanted = {m.name for m in linear.values() if m.kind != "experts"}
    acts: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
            acts[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return hook

    handles = [mod.register_forward_pre_hook(keep(name)) for name, mod in model.named_modules()
               if name in wanted and isinstance(mod, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return acts
