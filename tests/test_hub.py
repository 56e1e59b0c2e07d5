"""Sources by Hugging Face id, against a real HTTP hub on 127.0.0.1 (tests/hub_server.py).

The CLI runs in a subprocess with HF_ENDPOINT pointed at the loopback hub and HF_HOME in a
temporary folder, as a user would run it; the server counts every body byte it sends.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_MOE, write_yaml
from hub_server import HubServer
from mixload.core import config as config_mod
from mixload.core import header_only
from mixload.core.errors import ConfigError
from mixload.core.formats import Fp8, Gptq

BF16, FP8, INT4 = "test-org/Small-MoE", "test-org/Small-MoE-FP8", "test-org/Small-MoE-GPTQ-Int4"
CLASSIC_RULES = [{"match": "*.mlp.experts.*", "use": "int4"},
                 {"match": "*.self_attn.*", "use": "bf16"}]


def classic_mix(bf16: str, fp8: str, int4: str) -> dict:
    """BF16 attention, INT4 experts, everything else from the FP8 base (the README's mix)."""
    return {"sources": {"bf16": bf16, "fp8": fp8, "int4": {"path": int4, "revision": "main"}},
            "base": "fp8", "rules": CLASSIC_RULES}


class Hub:
    """The loopback hub, a fresh HF cache, and the `mixload` command pointed at both."""

    def __init__(self, server: HubServer, root: Path) -> None:
        self.server, self.root = server, root
        self.cache = root / "hf" / "hub"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("HF_", "HUGGINGFACE_"))}   # no token, no real endpoint
        self.env.update(HF_ENDPOINT=server.url, HF_HOME=str(root / "hf"),
                        HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")

    def mixload(self, *args: str | Path, offline: bool = False) -> subprocess.CompletedProcess:
        env = {**self.env, "HF_HUB_OFFLINE": "1" if offline else "0"}
        return subprocess.run([sys.executable, "-m", "mixload.core.cli", *map(str, args)],
                              env=env, capture_output=True, text=True, timeout=300)

    def cached_weights(self) -> list[Path]:
        return sorted(p for p in self.cache.rglob("*")
                      if p.name.endswith((".safetensors", ".incomplete")))


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with HubServer() as server:
        yield Hub(server, tmp_path)


def small_family(root: Path) -> dict[str, Path]:
    """The small MoE as BF16 / FP8 / GPTQ repositories of many small shards (so that a mix
    needs only some of them), with a tokenizer and generation config like published repos."""
    folders = {}
    for repo, fmt in ((BF16, None), (FP8, Fp8()), (INT4, Gptq())):
        folder = header_only.write(root / repo, SMALL_MOE, fmt, shard_bytes=256 * 1024)
        (folder / "tokenizer.json").write_text('{"version": "1.0"}')
        (folder / "generation_config.json").write_text('{"do_sample": false}')
        (folder / "README.md").write_text("# model card\n")
        folders[repo] = folder
    return folders


def header_bytes(shard: Path) -> int:
    with open(shard, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def planned_files(plan_json: str) -> dict[str, set[str]]:
    return {n: set(s["files"]) for n, s in json.loads(plan_json)["sources"].items()}


def test_an_org_name_path_is_a_hub_id_unless_that_folder_exists(tmp_path: Path) -> None:
    mix = write_yaml(tmp_path / "mix.yaml", classic_mix(BF16, FP8, INT4))
    cfg = config_mod.load(mix)
    assert cfg.sources["bf16"].path == BF16
    assert cfg.sources["int4"].revision == "main"
    (tmp_path / BF16).mkdir(parents=True)   # now `test-org/Small-MoE` is a folder next to the YAML
    assert config_mod.load(mix).sources["bf16"].path == str(tmp_path / BF16)
    (tmp_path / INT4).mkdir(parents=True)
    with pytest.raises(ConfigError, match="revision applies to Hugging Face ids only"):
        config_mod.load(mix)


def test_planning_real_shapes_by_hub_id_transfers_only_header_bytes(
        hub: Hub, qwen3_30b: dict[str, Path]) -> None:
    repos = {"Qwen/Qwen3-30B-A3B": qwen3_30b["bf16"], "Qwen/Qwen3-30B-A3B-FP8": qwen3_30b["fp8"],
             "Qwen/Qwen3-30B-A3B-GPTQ-Int4": qwen3_30b["gptq"]}
    for repo, folder in repos.items():
        hub.server.add(repo, folder)
    mix = write_yaml(hub.root / "mix.yaml", classic_mix(*repos))

    run = hub.mixload("plan", mix, "--json")

    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["sources"]["int4"]["repo"] == "Qwen/Qwen3-30B-A3B-GPTQ-Int4"
    shard_bytes = {repo: sum(p.stat().st_size for p in folder.glob("*.safetensors"))
                   for repo, folder in repos.items()}
    for repo, folder in repos.items():
        sent = hub.server.sent_for(repo, ".safetensors")
        assert sent, f"no header of {repo} was read"
        # Each shard read is read exactly to the end of its header: not one byte of data.
        assert sent == {f: header_bytes(folder / f) for f in sent}
        assert sum(sent.values()) < 1e-3 * shard_bytes[repo]   # headers: < 0.1 %
    assert hub.cached_weights() == []


def test_a_repository_without_index_plans_from_its_one_shard_header(hub: Hub) -> None:
    folder = header_only.write(hub.root / "one", SMALL_MOE, None, shard_bytes=2**30)
    (folder / "model.safetensors.index.json").unlink()
    shard = folder / "model.safetensors"
    next(folder.glob("*.safetensors")).rename(shard)
    hub.server.add(BF16, folder)

    run = hub.mixload("check", write_yaml(hub.root / "mix.yaml", {"sources": {"bf16": BF16}}))

    assert run.returncode == 0, run.stderr
    assert hub.server.sent_for(BF16, ".safetensors") == {shard.name: header_bytes(shard)}


@pytest.fixture
def small_hub(hub: Hub) -> tuple[Hub, dict[str, Path], Path]:
    folders = small_family(hub.root / "repos")
    for repo, folder in folders.items():
        hub.server.add(repo, folder)
    return hub, folders, write_yaml(hub.root / "mix.yaml", classic_mix(BF16, FP8, INT4))


def test_fetch_downloads_exactly_the_planned_shards_once(small_hub) -> None:
    hub, folders, mix = small_hub
    needed = planned_files(hub.mixload("plan", mix, "--json").stdout)
    shards = {repo: {p.name: p for p in folders[repo].glob("*.safetensors")} for repo in folders}
    repos = {"bf16": BF16, "fp8": FP8, "int4": INT4}
    for name, repo in repos.items():
        assert needed[name] < set(shards[repo]), f"{name}: the mix should need only some shards"

    hub.server.reset()
    dry = hub.mixload("fetch", mix, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "to download" in dry.stdout and hub.cached_weights() == []
    for name, repo in repos.items():   # planning read the headers of the planned shards only
        assert hub.server.sent_for(repo, ".safetensors") == {
            f: header_bytes(shards[repo][f]) for f in needed[name]}

    hub.server.reset()
    run = hub.mixload("fetch", mix)

    assert run.returncode == 0, run.stderr
    for name, repo in repos.items():
        # planned shards: their header (planning) + the whole file (download); others: nothing
        assert hub.server.sent_for(repo, ".safetensors") == {
            f: header_bytes(shards[repo][f]) + shards[repo][f].stat().st_size
            for f in needed[name]}
        snapshot = next((hub.cache / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
        assert {p.name for p in snapshot.glob("*.safetensors")} == needed[name]
        assert (snapshot / "tokenizer.json").exists() == (name == "fp8")   # the base's only
        assert not (snapshot / "README.md").exists()

    hub.server.reset()
    again = hub.mixload("fetch", mix)
    assert again.returncode == 0, again.stderr
    assert sum(hub.server.sent.values()) == 0


def test_the_fetched_cache_plans_and_builds_offline(small_hub) -> None:
    hub, folders, mix = small_hub
    online = hub.mixload("plan", mix, "--json")
    early = hub.mixload("build", mix, "-o", hub.root / "early")
    assert early.returncode == 2 and "mixload fetch" in early.stderr
    assert not (hub.root / "early").exists()
    assert hub.mixload("fetch", mix).returncode == 0
    hub.server.reset()

    offline = hub.mixload("plan", mix, "--json", offline=True)
    build = hub.mixload("build", mix, "-o", hub.root / "served", offline=True)

    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["fingerprint"] == json.loads(online.stdout)["fingerprint"]
    assert build.returncode == 0, build.stderr
    written = yaml.safe_load((hub.root / "served" / "mix.yaml").read_text())
    assert written["sources"]["int4"] == {"path": INT4, "revision": hub.server.repos[INT4].sha}
    assert (hub.root / "served" / "tokenizer.json").exists()
    explain = hub.mixload("explain", mix, "model.layers.0.self_attn.qkv_proj", offline=True)
    assert explain.returncode == 0 and BF16 in explain.stdout
    # the engines re-plan the built folder's mix.yaml from the cache, offline
    assert hub.mixload("check", hub.root / "served" / "mix.yaml", offline=True).returncode == 0
    assert sum(hub.server.sent.values()) == 0

    # A mix that needs shards never fetched: the error names the source, the file and the fix.
    all_bf16 = write_yaml(hub.root / "bf16.yaml", {"sources": {"bf16": BF16}})
    missing = hub.mixload("check", all_bf16, offline=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "source 'bf16'" in missing.stderr and ".safetensors" in missing.stderr
    assert f"mixload fetch {all_bf16}" in missing.stderr


def _rewrite_header(shard: Path, change) -> None:
    with open(shard, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = shard.stat().st_size - 8 - n
    change(header)
    raw = json.dumps(header).encode()
    with open(shard, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + data)


def _lie(header: dict) -> None:
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**9


BROKEN = {   # what the server does wrong -> what the user reads
    "wrong id": (lambda f: None, "test-org/Small-MoE-Typo", None, "no repository"),
    "wrong revision": (lambda f: None, BF16, "v9", "has no revision 'v9'"),
    "404 file": (lambda f: (f / "model-00002-of-00006.safetensors").unlink(), BF16, None,
                 "has no file 'model-00002-of-00006.safetensors'"),
    "truncated header": (lambda f: os.truncate(f / "model-00002-of-00006.safetensors", 100),
                         BF16, None, "does not fit the file"),
    "lying header": (lambda f: _rewrite_header(f / "model-00002-of-00006.safetensors", _lie),
                     BF16, None, "bad header entry"),
    "gated (401)": ("gated", BF16, None, "is gated"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_hub_gives_a_clear_error_and_exit_2(hub: Hub, case: str) -> None:
    breaks, repo, revision, expected = BROKEN[case]
    folder = header_only.write(hub.root / "repo", SMALL_MOE, None, shard_bytes=1024 * 1024)
    assert (folder / "model-00002-of-00006.safetensors").exists()
    if breaks != "gated":
        breaks(folder)
    hub.server.add(BF16, folder, gated=breaks == "gated")
    spec = {"path": repo, **({"revision": revision} if revision else {})}
    mix = write_yaml(hub.root / "mix.yaml", {"sources": {"bf16": spec}})

    for command in (("check", mix), ("fetch", mix)):
        run = hub.mixload(*command)
        assert run.returncode == 2, run.stderr
        assert expected in run.stderr and "source 'bf16'" in run.stderr
        assert "Traceback" not in run.stderr
    assert hub.cached_weights() == []   # nothing downloaded, nothing half-written
