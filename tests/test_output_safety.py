"""Outputs never touch a source: `build`, `convert` and `fetch` refuse an output that is, contains
or lies inside a source folder (symlinks resolved), `--overwrite` replaces only what mixload made,
temporary folders go on SIGINT / SIGTERM and the next run sweeps those of a killed one, and
every OS error a user can cause is exit 2 with file and fix. Each test hashes the sources before
and after: not one byte of them changes, whatever the flags.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from transformers import Qwen3Config

from conftest import write_yaml
from mixload.core.cli import main
from mixload.core.tiny_family import write_random
from test_hub import BF16, FP8, INT4, Hub, hub, small_family  # noqa: F401 (hub: fixture)

# One small dense Qwen3 layer: every linear dim a multiple of 128 (fp8 blocks, int4 groups).
TINY = dict(hidden_size=256, num_hidden_layers=1, num_attention_heads=4, head_dim=64,
            num_key_value_heads=2, vocab_size=256, intermediate_size=256,
            tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])


MARKER = ".mixload-output"     # in every folder mixload writes


def host() -> str:
    """This machine, as mixload's temporary folder names spell it."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links followed) -> sha256 of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """`mixload ARGS` in this process: (exit code, stderr). An exception escaping main is a
    traceback for the user, so it fails the test."""
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def script(*lines: str) -> list[str]:
    """A python command running `lines`, then `mixload ARGV` (argv after the command)."""
    return [sys.executable, "-c", "\n".join([*lines, "import sys",
                                             "from mixload.core.cli import main",
                                             "sys.exit(main(sys.argv[1:]))"])]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "qwen3"
    write_random(path, Qwen3Config(**TINY))
    return path


@pytest.fixture
def src(checkpoint: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny BF16 checkpoint at tmp/models/qwen3 (tests may try to harm it)."""
    return Path(shutil.copytree(checkpoint, tmp_path / "models" / "qwen3"))


@pytest.fixture
def mix(small_moe: dict[str, Path], tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "mix.yaml", {
        "sources": {k: str(v) for k, v in small_moe.items()}, "base": "fp8",
        "rules": [{"match": "*.mlp.experts.*", "use": "gptq"}]})


# ---- an output that is, contains or lies inside a source

@pytest.mark.parametrize("where,message", [
    ("small/bf16", "is the source folder"),
    ("small", "contains the source folder"),
    (".", "contains the source folder"),
    ("small/gptq/served", "lies inside the source folder"),
    ("link-to-fp8", "is the source folder"),          # a symlink is resolved
    ("link-to-fp8/served", "lies inside the source folder"),
])
def test_build_refuses_an_output_that_touches_a_source(
        mix: Path, small_moe: dict[str, Path], tmp_path: Path, capsys, where: str,
        message: str) -> None:
    (tmp_path / "link-to-fp8").symlink_to(small_moe["fp8"])
    before = digest(tmp_path / "small")

    rc, err = run(capsys, "build", mix, "-o", tmp_path / where, "--overwrite")

    assert rc == 2 and message in err and "fix: choose a folder outside" in err
    assert digest(tmp_path / "small") == before


@pytest.mark.parametrize("where,message", [
    ("models/qwen3", "is the source folder"),
    ("models", "contains the source folder"),        # today: deletes the source and its siblings
    ("models/qwen3/fp8", "lies inside the source folder"),
    ("link", "is the source folder"),
])
def test_convert_refuses_an_output_that_touches_its_source(
        src: Path, tmp_path: Path, capsys, where: str, message: str) -> None:
    (tmp_path / "link").symlink_to(src)
    before = digest(src)

    rc, err = run(capsys, "convert", src, "--to", "fp8", "-o", tmp_path / where, "--overwrite")

    assert rc == 2 and message in err
    assert digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "models"]


def test_a_mixload_folder_that_now_holds_a_source_is_not_replaced(
        mix: Path, small_moe: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert run(capsys, "build", mix, "-o", tmp_path / "served")[0] == 0
    moved = tmp_path / "served" / "gptq"        # the user keeps a checkpoint in the folder
    small_moe["gptq"].rename(moved)
    mix = write_yaml(mix, {"sources": {"bf16": str(small_moe["bf16"]), "gptq": str(moved)},
                           "rules": [{"match": "*.mlp.experts.*", "use": "gptq"}]})
    before = digest(moved)

    rc, err = run(capsys, "build", mix, "-o", tmp_path / "served", "--overwrite")

    assert rc == 2 and "contains the source folder" in err
    assert digest(moved) == before


# ---- --overwrite replaces only what mixload made

def test_overwrite_refuses_a_folder_mixload_did_not_make(
        mix: Path, src: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    sources = {**digest(tmp_path / "small"), **digest(src)}

    for args in (["build", mix], ["convert", src, "--to", "fp8"]):
        rc, err = run(capsys, *args, "-o", mine, "--overwrite")
        assert rc == 2 and "mixload did not make it" in err and str(mine) in err
        assert (mine / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me too")
    rc, err = run(capsys, "build", mix, "-o", a_file, "--overwrite")
    assert rc == 2 and "is not a folder" in err and a_file.read_text() == "keep me too"
    assert {**digest(tmp_path / "small"), **digest(src)} == sources


def test_overwrite_replaces_a_folder_mixload_made_or_an_empty_one(
        src: Path, tmp_path: Path, capsys) -> None:
    before = digest(src)
    out = tmp_path / "fp8"
    out.mkdir()                                      # empty: nothing to lose
    assert run(capsys, "convert", src, "--to", "fp8", "-o", out, "--overwrite")[0] == 0
    assert (out / MARKER).is_file()
    assert run(capsys, "convert", src, "--to", "ct-fp8", "-o", out, "--overwrite")[0] == 0
    assert "compressed-tensors" in (out / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp8", "models"]   # no temp, no old
    assert digest(src) == before


# ---- temporary folders: signals, killed runs, modes

PAUSE = ("import time, mixload.core.convert as c",
         "_orig = c._write_weights",
         "def _slow(*a, **k):",
         "    r = _orig(*a, **k); print('written', flush=True); time.sleep(300); return r",
         "c._write_weights = _slow")


def start_paused_convert(src: Path, out: Path) -> subprocess.Popen[str]:
    """A `mixload convert` that stops for 5 minutes once its weights are written."""
    p = subprocess.Popen([*script(*PAUSE), "convert", str(src), "--to", "fp8", "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "written", p.stderr
    assert [q.name for q in out.parent.glob(f".{out.name}.tmp-*")], "no temp folder while writing"
    return p


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_remove_the_temporary_folder(
        src: Path, tmp_path: Path, sig: int, code: int) -> None:
    before = digest(src)
    p = start_paused_convert(src, tmp_path / "out")
    p.send_signal(sig)
    assert p.wait(timeout=60) == code
    assert "Traceback" not in p.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert digest(src) == before


def test_the_next_run_sweeps_what_a_killed_run_left(src: Path, tmp_path: Path, capsys) -> None:
    before = digest(src)
    p = start_paused_convert(src, tmp_path / "out")
    p.kill()                                         # SIGKILL: no handler runs
    p.wait(timeout=60)
    [stale] = tmp_path.glob(".out.tmp-*")
    alive = tmp_path / f".x.tmp-{host()}-{os.getpid()}-running"   # a live run's
    alive.mkdir()
    (alive / MARKER).write_text("{}")
    users = tmp_path / ".notes.tmp-mine-1-keep"      # not mixload's: no marker
    users.mkdir()
    (users / "notes.txt").write_text("keep")

    rc, err = run(capsys, "convert", src, "--to", "fp8", "-o", tmp_path / "out")

    assert rc == 0 and f"removed {stale}" in err and "killed" in err
    assert not stale.exists() and alive.is_dir() and (users / "notes.txt").is_file()
    assert digest(src) == before


def test_a_tiny_family_sibling_is_converted_into_its_temporary_folder(
        src: Path, tmp_path: Path) -> None:
    """tiny_family.sibling's path (without training): convert replaces the marked, empty
    temporary folder of `_atomic`, which is then renamed into place."""
    from mixload.core import tiny_family
    from mixload.core.convert import convert

    before = digest(src)
    dest = tmp_path / "qwen3-fp8"
    assert tiny_family._atomic(dest, lambda tmp: convert(src, tmp, "fp8", overwrite=True)) == dest
    assert (dest / "config.json").is_file() and (dest / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "qwen3-fp8"]
    assert digest(src) == before


def test_output_folders_follow_the_umask(mix: Path, tmp_path: Path, capsys) -> None:
    old = os.umask(0o022)
    try:
        assert run(capsys, "build", mix, "-o", tmp_path / "served")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "served").stat().st_mode) == 0o755   # mkdtemp alone: 0700


# ---- OS errors: exit 2 with file and fix, nothing left behind

def test_disk_full_during_convert_is_exit_2_and_leaves_nothing(
        src: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from mixload.core import convert

    def full(self: convert.ShardWriter) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(convert.ShardWriter, "_finish_shard", full)
    before = digest(src)

    rc, err = run(capsys, "convert", src, "--to", "fp8", "-o", tmp_path / "out")

    assert rc == 2 and "No space left on device (ENOSPC)" in err
    assert f"file: {tmp_path / 'out'}" in err and "fix: free space" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert digest(src) == before


@pytest.mark.parametrize("code,fix", [
    (errno.EROFS, "read-only"), (errno.EACCES, "you may not write there"),
    (errno.ENOSPC, "free space")])
def test_an_output_folder_that_cannot_be_made_is_exit_2(
        mix: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, code: int,
        fix: str) -> None:
    # Tests may run as root, where a read-only mode does not stop a write: raise as the OS would.
    def refuse(*args: object, **kwargs: object) -> str:
        raise OSError(code, os.strerror(code), str(tmp_path))
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    before = digest(tmp_path / "small")

    rc, err = run(capsys, "build", mix, "-o", tmp_path / "served")

    assert rc == 2 and f"({errno.errorcode[code]})" in err and fix in err
    assert not (tmp_path / "served").exists() and digest(tmp_path / "small") == before


def test_an_output_under_a_file_is_exit_2(mix: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "a-file").write_text("x")
    rc, err = run(capsys, "build", mix, "-o", tmp_path / "a-file" / "served")
    assert rc == 2 and "(ENOTDIR)" in err and "part of the path is a file" in err


def test_any_os_error_reaching_the_cli_is_exit_2(mix: Path, capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mixload.core import config

    def unreadable(path: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(config, "load", unreadable)
    rc, err = run(capsys, "check", mix)
    assert rc == 2 and "(EACCES)" in err and f"file: {mix}" in err


# ---- fetch

def test_fetch_never_downloads_into_a_local_source(hub: Hub, tmp_path: Path) -> None:  # noqa: F811
    folders = small_family(tmp_path / "repos")
    for repo, folder in folders.items():
        hub.server.add(repo, folder)
    local = folders[BF16]                            # the BF16 source, given as a folder
    hub.env["HF_HOME"] = str(local / ".hf")          # ... and the HF cache set inside it
    mix = write_yaml(tmp_path / "mix.yaml", {
        "sources": {"bf16": str(local), "fp8": FP8, "int4": INT4}, "base": "fp8",
        "rules": [{"match": "*.mlp.experts.*", "use": "int4"}]})
    before = digest(local)

    r = hub.mixload("fetch", mix)

    assert r.returncode == 2 and "lies inside the source folder" in r.stderr, r.stderr
    assert "HF_HOME" in r.stderr
    assert "Traceback" not in r.stderr
    after = digest(local)
    assert {f: after[f] for f in before} == before                  # every source byte kept
    assert not [f for f in after if f.endswith(".safetensors") and f not in before]


def test_disk_full_during_fetch_is_exit_2(hub: Hub, tmp_path: Path) -> None:  # noqa: F811
    folders = small_family(tmp_path / "repos")
    for repo, folder in folders.items():
        hub.server.add(repo, folder)
    mix = write_yaml(tmp_path / "mix.yaml", {"sources": {"bf16": BF16, "fp8": FP8}, "base": "fp8",
                                             "rules": [{"match": "*.self_attn.*", "use": "bf16"}]})
    full = script("import errno, huggingface_hub as h",
                  "_orig = h.hf_hub_download",
                  "def _full(repo, filename, **kw):",
                  "    if filename.endswith('.safetensors'):",
                  "        raise OSError(errno.ENOSPC, 'No space left on device')",
                  "    return _orig(repo, filename, **kw)",
                  "h.hf_hub_download = _full")
    r = subprocess.run([*full, "fetch", str(mix)], env={**hub.env, "HF_HUB_OFFLINE": "0"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "(ENOSPC)" in r.stderr and "downloading" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ---- bad arguments and missing extras

@pytest.mark.parametrize("group", ["0", "-2"])
def test_convert_group_must_be_positive_or_minus_one(src: Path, tmp_path: Path, capsys,
                                                     group: str) -> None:
    rc, err = run(capsys, "convert", src, "--to", "gptq-int4", "--group", group,
                  "-o", tmp_path / "out")
    assert rc == 2 and f"group size {group}" in err and "-1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


@pytest.mark.parametrize("module,args,extra", [
    ("torch", ["convert", "{src}", "--to", "fp8", "-o", "{tmp}/out"], "formats"),
    ("torch", ["analyze", "{small}/bf16", "{small}/fp8", "--budget", "1GiB"], "formats"),
    ("matplotlib", ["analyze", "{small}/bf16", "{small}/fp8", "--budget", "1GiB",
                    "--plot", "{tmp}/f.png"], "analyze"),
])
def test_a_missing_optional_dependency_names_the_extra(
        src: Path, small_moe: dict[str, Path], tmp_path: Path, capsys,
        monkeypatch: pytest.MonkeyPatch, module: str, args: list[str], extra: str) -> None:
    before = digest(src)
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)   # `import torch` now fails as if absent

    rc, err = run(capsys, *(a.format(src=src, tmp=tmp_path, small=tmp_path / "small")
                            for a in args))

    assert rc == 2 and f"needs {module}, which is not installed" in err
    assert f'pip install "mixload[{extra}]"' in err
    assert digest(src) == before and not (tmp_path / "out").exists()


def test_serve_sglang_without_sglang_names_its_extra(capsys) -> None:
    rc, err = run(capsys, "serve", "sglang", "--port", "1")
    assert rc == 2 and 'pip install "mixload[sglang]"' in err


def test_a_yaml_nested_too_deep_is_exit_2(tmp_path: Path, capsys) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("sources: " + "[" * 20000 + "]" * 20000 + "\n")
    rc, err = run(capsys, "check", deep)
    assert rc == 2 and "error:" in err
