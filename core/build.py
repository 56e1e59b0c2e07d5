"""`mixload build`: a model folder an engine opens — config, plan and tokenizer, no weight copies.

The folder's config.json is the base source's, with
`quantization_config = {"quant_method": "mixload", "fingerprint": ..., "mix": "mix.yaml"}`;
the engine adapter rebuilds the plan from `mix.yaml` (every source path absolute) and refuses to
load if the checkpoints changed since the build: the fingerprint covers every planned tensor's
file, offsets, dtype and shape; files.json each planned file's size and mtime; with `--lock`,
lock.json each planned tensor's content hash (core/lock.py).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from . import output
from .config import SEED_PRECISIONS, MixConfig, load, parse
from .convert import SIDE_FILES   # tokenizer files
from .errors import ConfigError
from .hub import check_cached
from .lock import record
from .plan import Plan, build_plan

MIX = "mix.yaml"
PLAN = "plan.json"
QUANT_METHOD = "mixload"


def build(config_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
          overwrite: bool = False, lock: bool = False) -> Path:
    """Plan the mix YAML and write its model folder to `out_dir`; returns the folder.

    The folder appears only once complete (see core/output.py). It may not be, contain or lie
    inside a source folder; an existing one is replaced only with `overwrite=True`, and only if
    mixload made it. With `lock=True` every planned tensor's bytes are read and hashed into a
    lockfile the loader checks (core/lock.py)."""
    cfg = load(config_path)
    plan = build_plan(cfg)
    check_cached(plan)   # the engines read the weights from disk: every planned shard is there
    out = output.guard(out_dir, {f for src in plan.sources.values()
                                 for f in output.source_folders(src)}, overwrite)
    return output.write(out, lambda tmp: _write(plan, tmp, lock), "mixload build")


def _write(plan: Plan, folder: Path, lock: bool = False) -> None:
    base = plan.sources[plan.config.base]
    mix = normalized(plan.config)
    if plan.config.form == "rules":   # the engines load the very commits that were planned
        for name, src in plan.sources.items():
            if src.hub is not None:
                mix["sources"][name]["revision"] = src.hub.commit
    # The copy must mean exactly what the user's YAML meant.
    if build_plan(parse(mix, folder / MIX)).fingerprint != plan.fingerprint:
        raise ConfigError("the normalized mix config plans differently from the original",
                          file=plan.config.file, fix="report this as a mixload bug")
    (folder / MIX).write_text(yaml.safe_dump(mix, sort_keys=False), encoding="utf-8")
    (folder / PLAN).write_text(json.dumps(plan.to_json(), indent=2) + "\n", encoding="utf-8")
    hashes = None
    if lock:
        from .stream import content_hashes   # reads the tensors as the loader will (needs torch)
        hashes = content_hashes(plan)
    record(plan, folder, hashes)
    config = {k: v for k, v in base.config.items() if k != "compression_config"}
    config["quantization_config"] = quantization_config(plan)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for pattern in SIDE_FILES:
        for f in base.path.glob(pattern):
            if f.is_file():
                shutil.copy2(f, folder / f.name)


def quantization_config(plan: Plan) -> dict[str, Any]:
    """What the folder's config.json declares. No `producer` / `quant_algo` keys: vLLM would
    hand such a config to ModelOpt instead of the plugin."""
    return {"quant_method": QUANT_METHOD, "fingerprint": plan.fingerprint, "mix": MIX}


def normalized(cfg: MixConfig) -> dict[str, Any]:
    """The mix YAML in its own form, with every path absolute and every default explicit."""
    if cfg.form == "seed":
        mp: dict[str, Any] = {f"{p}_path": cfg.sources[p].path for p in SEED_PRECISIONS
                              if p in cfg.sources}
        mp["base_model_path"] = cfg.sources[cfg.base].path
        mp["weight_mapping"] = {r.pattern: r.use for r in cfg.rules}
        mp["on_conflict"] = cfg.on_conflict
        return {"mixed_precision": mp}
    sources = {name: s.model_dump(exclude_none=True) for name, s in cfg.sources.items()}
    return {"sources": sources, "base": cfg.base,
            "rules": [{"match": r.pattern, "use": r.use} for r in cfg.rules],
            "on_conflict": cfg.on_conflict}

