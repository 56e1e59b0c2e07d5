"""Error scores: how far each source's version of a decision unit is from the unquantized one,
measured from the checkpoints' own tensors (dequantized with each format's reference).

The score of a unit in a source is its relative squared output error
    sum ||X (W - W')^T||^2 / sum ||X W^T||^2        (over the unit's modules)
on calibration activations X captured from the unquantized model, or with X = I (the relative
weight error) when there is no calibration text. For the experts of a MoE layer it is the error
of the whole routed block output (gate/up, SiLU, down, routing weights) on the tokens routed to
each expert, so a rarely used expert weighs what it really contributes.

Why squared and summed: each unit adds its own small, roughly independent perturbation to the
residual stream, and independent noise powers add; each unit counts once, whatever its size
(a layer's experts are one block output, like its attention), so the budget planner spends bytes
where they buy the largest drop of total noise.

Scores are cached per (reference, candidate, calibration) under the mixload cache, keyed by the
plans' fingerprints (tensor names, dtypes, shapes, offsets) and the files' sizes and mtimes: a
second run reads no tensor and loads no model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .analyze import Inventory, Unit
from .errors import ConfigError
from .plan import Plan

if TYPE_CHECKING:
    import torch
    from torch import Tensor

VERSION = 1            # bump when the score's definition changes: old cache entries are ignored
CALIB_TOKENS = 2048
WINDOW = 256

Scores = dict[tuple[str, str], float]     # (unit group, source) -> score


def reference_source(inv: Inventory) -> str:
    """The unquantized source errors are measured against."""
    unquantized = [n for n in inv.specs if all(u.options[n].bits >= 16 for u in inv.units)]
    if not unquantized:
        raise ConfigError("measuring error needs an unquantized (BF16/FP16) checkpoint of the "
                          "model among the sources, as the reference",
                          fix="add the BF16 checkpoint to the sources, or leave out --budget")
    return inv.base if inv.base in unquantized else unquantized[0]


# ---- the error of one unit -------------------------------------------------------------------

def linear_error(ref: list["Tensor"], got: list["Tensor"], x: "Tensor | None") -> float:
    """Relative squared output error of modules sharing one input X (X = None: weight error)."""
    num = den = 0.0
    for w, q in zip(ref, got):
        d = w - q
        if x is not None:
            d, w = x @ d.T, x @ w.T
        num += float(d.square().sum())
        den += float(w.square().sum())
    return num / den if den else 0.0


def moe_output(weights: list[tuple["Tensor", "Tensor", "Tensor"]], x: "Tensor", index: "Tensor",
               routing: "Tensor") -> "Tensor":
    """The routed experts' output: sum over each token's experts of p * down(silu(gate x) * up x)."""
    import torch
    import torch.nn.functional as F

    y = torch.zeros(x.shape[0], weights[0][2].shape[0])
    for e, (gate, up, down) in enumerate(weights):
        tok, slot = (index == e).nonzero(as_tuple=True)
        if tok.numel():
            h = x[tok]
            y.index_add_(0, tok, ((F.silu(h @ gate.T) * (h @ up.T)) @ down.T)
                         * routing[tok, slot, None])
    return y


def experts_error(ref: list["Tensor"], got: list["Tensor"], acts: tuple | None) -> float:
    """Relative squared error of a MoE layer's output (all experts together)."""
    if acts is None:
        return linear_error(ref, got, None)
    x, index, routing = acts
    triples = lambda ws: [tuple(ws[i:i + 3]) for i in range(0, len(ws), 3)]  # gate, up, down
    y = moe_output(triples(ref), x, index, routing)
    d = y - moe_output(triples(got), x, index, routing)
    den = float(y.square().sum())
    return float(d.square().sum()) / den if den else 0.0


def unit_error(unit: Unit, ref: list["Tensor"], got: list["Tensor"], acts: Any) -> float:
    return (experts_error if unit.kind == "experts" else linear_error)(ref, got, acts)


# ---- calibration activations -----------------------------------------------------------------

def capture(folder: str, units: list[Unit], text: str, max_tokens: int = CALIB_TOKENS) -> dict[str, Any]:
    """Each unit's input on `text`, from the unquantized model in transformers: the input of
    its first module (q_proj for qkv, gate_proj for gate/up), or for a MoE layer's experts the
    hidden states with the router's choices (index, weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # ours (tqdm over units) is the one that matters
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tok(text, verbose=False)["input_ids"][:max_tokens])
    if ids.numel() < 2:
        raise ConfigError("the calibration text is empty after tokenization",
                          fix="give --calib a text file of a few thousand words")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen: dict[str, list[tuple]] = {u.group: [] for u in units}

    def hook(group: str):
        return lambda module, args: seen[group].append(tuple(a.detach().reshape(-1, a.shape[-1])
                                                             if a.dim() > 1 else a for a in args[:3]))
    handles = [model.get_submodule(u.group if u.kind == "experts" else u.modules[0])
               .register_forward_pre_hook(hook(u.group)) for u in units]
    try:
        with torch.no_grad():
            for start in range(0, ids.numel(), WINDOW):
                model(ids[start:start + WINDOW].unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    out: dict[str, Any] = {}
    for u in units:
        calls = seen[u.group]
        if u.kind == "experts":   # (hidden [n, h], top-k index [n, k], top-k weights [n, k])
            out[u.group] = tuple(torch.cat([c[i] for c in calls]).float() if i != 1
                                 else torch.cat([c[i] for c in calls]) for i in range(3))
        else:
            out[u.group] = torch.cat([c[0] for c in calls]).float()
    return out


# ---- streaming, caching ----------------------------------------------------------------------

def _unit_weights(plan: Plan, unit: Unit) -> list["Tensor"]:
    """The unit's modules from one source, dequantized to float32, in the unit's order."""
    from .reference import dequantized_weights

    rows = plan.by_name()
    sub = dataclasses.replace(plan, assignments=[rows[m] for m in unit.modules])
    weights = dequantized_weights(sub)
    return [weights[f"{m}.weight"] for m in unit.modules]


def _files_key(plan: Plan) -> str:
    files = sorted({t.file for a in plan.assignments for t in a.tensors.values()})
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return plan.fingerprint + json.dumps(stats)


def cache_key(inv: Inventory, ref: str, source: str, calib: str | None) -> str:
    blob = json.dumps([VERSION, _files_key(inv.plans[ref]), _files_key(inv.plans[source]),
                       hashlib.sha256(calib.encode()).hexdigest() if calib else None,
                       CALIB_TOKENS if calib else None])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def scores(inv: Inventory, calib: str | None = None, cache_dir: Path | None = None,
           progress: bool | None = None) -> Scores:
    """The score of every unit in every source (the reference's own are 0). Streams one unit
    at a time; only what the cache lacks is read, and the model is loaded only if it lacks any."""
    from tqdm import tqdm

    from .tiny_family import cache_root

    ref = reference_source(inv)
    root = cache_root(cache_dir) / "scores"
    cached = {s: _read_cache(root / f"{cache_key(inv, ref, s, calib)}.json")
              for s in inv.specs if s != ref}
    todo = [u for u in inv.units if any(u.group not in c for c in cached.values())]
    acts = capture(inv.paths[ref], todo, calib) if (calib and todo) else {}
    for unit in tqdm(todo, desc="error scores", unit="unit", disable=None if progress is None
                     else not progress):
        want = _unit_weights(inv.plans[ref], unit)
        for s, c in cached.items():
            if unit.group not in c:
                c[unit.group] = unit_error(unit, want, _unit_weights(inv.plans[s], unit),
                                           acts.get(unit.group))
    if todo:
        for s, c in cached.items():
            _write_cache(root / f"{cache_key(inv, ref, s, calib)}.json", c)
    out: Scores = {(u.group, ref): 0.0 for u in inv.units}
    out.update({(u.group, s): c[u.group] for s, c in cached.items() for u in inv.units})
    return out


def total(score: Scores, choice: dict[str, str]) -> float:
    """The weighted error of a mix: the sum of its units' scores."""
    return sum(score[(g, s)] for g, s in choice.items())
