"""Launch SGLang with the seed's flags:

    python -m mixload.adapters.sglang.launch --enable-mixed-precision \\
        --mixed-precision-config mix.yaml --model-path /m/Qwen3-30B-A3B-FP8 \\
        --tp-size 4 --dp-size 2 --host 0.0.0.0 --port 30000 \\
        --max-running-requests 64 --max-total-tokens 16384 --dtype bfloat16

`--enable-mixed-precision` and `--mixed-precision-config` are the contract of the seed documents;
every other flag is SGLang's own and passes through untouched. Without `--enable-mixed-precision`
this is plain `sglang serve`. With it, the launcher plans first (every check, before any GPU is
touched; a bad YAML exits 2 with every problem listed), prints the plan and its fingerprint, then
starts SGLang with `--quantization mixload` and the plan's location in
`--model-loader-extra-config`. Each worker rebuilds the plan, refuses a different fingerprint,
loads, audits, and writes what it loaded to a report folder that `GET /mixload` serves.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixload.core import catalog
from mixload.core.config import load as load_mix
from mixload.core.errors import MixloadError
from mixload.core.plan import Plan, build_plan

from .loader import Settings
from .plugin import NAME

ROUTE = "/mixload"


def seed_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--enable-mixed-precision", action="store_true",
                   help="load the model in mixed precision from the sources of the mix config")
    p.add_argument("--mixed-precision-config", metavar="YAML",
                   help="mixload YAML (seed `mixed_precision:` form or rule form)")
    p.add_argument("--mixload-report-dir", metavar="DIR",
                   help="where each rank writes what it loaded (default: a temp folder)")
    return p


@dataclass
class Launch:
    """Everything `main` hands to SGLang, built without starting anything (so it is testable)."""

    argv: list[str]                  # the SGLang argv actually used
    server_args: Any                 # sglang.srt.server_args.ServerArgs
    plan: Plan | None                # None without --enable-mixed-precision
    settings: Settings | None


def build(argv: list[str]) -> Launch:
    """Seed flags + SGLang flags -> the ServerArgs SGLang gets (and the plan)."""
    seed, rest = seed_parser().parse_known_args(argv)
    # The seed flags are checked before SGLang is imported (seconds, and it may not import).
    if seed.mixed_precision_config and not seed.enable_mixed_precision:
        raise MixloadError("--mixed-precision-config was given without --enable-mixed-precision",
                           fix="add --enable-mixed-precision")
    if seed.enable_mixed_precision and not seed.mixed_precision_config:
        raise MixloadError("--enable-mixed-precision needs --mixed-precision-config <yaml>")

    from .plugin import register
    register()   # --quantization mixload must be a valid choice before SGLang parses
    from sglang.srt.server_args import prepare_server_args

    if not seed.enable_mixed_precision:
        return Launch(rest, prepare_server_args(rest), None, None)

    mix_path = str(Path(seed.mixed_precision_config).resolve())
    # SGLang's own parse gives TP/EP (flag spellings and defaults are its business).
    probe = prepare_server_args(_with_model_path(rest, "."))
    plan = build_plan(load_mix(mix_path), tp=probe.tp_size, ep=max(probe.ep_size or 1, 1))
    report_dir = seed.mixload_report_dir or tempfile.mkdtemp(prefix="mixload-report-")
    settings = Settings(mix_path, plan.fingerprint, str(Path(report_dir).resolve()))

    base = str(plan.sources[plan.config.base].path)
    model_path = _flag(rest, "--model-path") or _flag(rest, "--model")
    if model_path is None:
        rest = ["--model-path", base, *rest]   # the seed's base_model_path
    else:
        _check_same_model(model_path, plan)
    quant = _flag(rest, "--quantization")
    if quant not in (None, NAME):
        raise MixloadError(f"--quantization {quant} conflicts with --enable-mixed-precision: the "
                           "plan decides each module's format", fix="drop --quantization")
    if quant is None:
        rest = [*rest, "--quantization", NAME]
    extra = json.loads(_flag(rest, "--model-loader-extra-config") or "{}")
    extra.update(settings.to_extra())
    rest = _set_flag(rest, "--model-loader-extra-config", json.dumps(extra))
    return Launch(rest, prepare_server_args(rest), plan, settings)


def _flag(argv: list[str], name: str) -> str | None:
    """The value of `--name v` or `--name=v` (last one wins, like argparse)."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def _set_flag(argv: list[str], name: str, value: str) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == name:
            skip = i + 1 < len(argv)
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return [*out, name, value]


def _with_model_path(argv: list[str], default: str) -> list[str]:
    has = _flag(argv, "--model-path") or _flag(argv, "--model")
    return argv if has else ["--model-path", default, *argv]


def _check_same_model(model_path: str, plan: Plan) -> None:
    """--model-path gives SGLang the model config and tokenizer: it must be the plan's model."""
    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.is_file():
        return   # a hub id: SGLang resolves it; the workers' plan checks the sources
    config = json.loads(cfg_file.read_text())
    base = plan.sources[plan.config.base].config
    diff = [k for k in catalog.ARCH_KEYS if config.get(k) != base.get(k)]
    if diff:
        raise MixloadError(f"--model-path is not the model of the mix: {', '.join(diff)} differ "
                           f"from the base source {plan.config.base!r}", file=cfg_file,
                           fix="point --model-path at one of the sources, or leave it out "
                               "(the base source is used)")


# ---- what the server exposes

def plan_summary(plan: Plan) -> dict[str, Any]:
    doc = plan.to_json()
    doc.pop("modules", None)   # 37k rows for a 235B model; `mixload plan --json` has them
    return doc


def mixload_info(launch: Launch) -> dict[str, Any]:
    """GET /mixload: the plan (fingerprint, sources, memory) and what each rank loaded."""
    if launch.plan is None or launch.settings is None:
        return {"enabled": False}
    ranks = []
    folder = Path(launch.settings.report_dir or "")
    for f in sorted(folder.glob("rank-*.json")) if folder.is_dir() else []:
        ranks.append(json.loads(f.read_text()))
    return {"enabled": True, "plan": plan_summary(launch.plan), "ranks": ranks,
            "loaded": all(r.get("fingerprint") == launch.plan.fingerprint for r in ranks)
            and bool(ranks)}


def install_endpoint(launch: Launch) -> None:
    """Add GET /mixload to SGLang's HTTP app (before it starts)."""
    from sglang.srt.entrypoints.http_server import app
    app.add_api_route(ROUTE, lambda: mixload_info(launch), methods=["GET"])


def log_plan(launch: Launch) -> None:
    from rich.console import Console

    from mixload.core.report import print_plan
    if launch.plan is None:
        return
    console = Console(stderr=True)
    print_plan(launch.plan, console)
    console.print(f"mixload: serving plan {launch.plan.fingerprint} from "
                  f"{launch.settings.config if launch.settings else '?'}; per-rank load reports in "
                  f"{launch.settings.report_dir if launch.settings else '?'} and at GET {ROUTE}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        launch = build(argv)
    except MixloadError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 2
    except ImportError as exc:   # SGLang missing or broken in this environment
        print(f"error: SGLang could not be imported: {exc}\n  fix: install it "
              '(pip install "mixload[sglang]") in this environment', file=sys.stderr)
        return 2
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    log_plan(launch)
    if launch.plan is not None:
        install_endpoint(launch)
    try:
        run_server(launch.server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
