"""pluggy hookspecs: the only contract between the core and the engine adapters.

Adapters register through the `mixload.adapters` entry-point group (see pyproject.toml); the
core never imports an engine.
"""
from __future__ import annotations

import pluggy

PROJECT = "mixload"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class AdapterSpec:
    @hookspec
    def mixload_backend(self) -> str:
        """The engine this adapter drives ("vllm", "sglang")."""

    @hookspec(firstresult=True)
    def mixload_serve(self, backend: str, argv: list[str]) -> int | None:
        """Start `backend` with the engine's own flags plus mixload's; None if not this backend."""

    @hookspec
    def mixload_build_files(self, plan: object, folder: str) -> dict[str, str] | None:
        """Extra files (name -> text) an engine needs in a `mixload build` folder."""


def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(AdapterSpec)
    pm.load_setuptools_entrypoints("mixload.adapters")
    return pm
