"""Sources given by Hugging Face id (`org/name`, optional `revision`), through huggingface_hub.

Resolution uses huggingface_hub and its cache as every HF tool does (HF_HOME / HF_HUB_CACHE,
HF_ENDPOINT, HF_HUB_OFFLINE, tokens from the usual places). Planning needs config.json, the index
and the safetensors headers: the two JSON files go into the cache (small; `fetch` keeps them
anyway), the header of a shard not in the cache is read with two range requests (8 bytes, then
exactly the header) and checked by the same validator as a local file. `fetch` then downloads
into the normal cache only the shards that hold planned tensors. Offline, cached shards are read
from disk and the tensors of the others are recorded as `uncached`: a plan that needs one fails
naming the source, the file and the command that fetches it.

huggingface_hub is imported only here and only when a hub id is used.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import output
from .convert import SIDE_FILES   # tokenizer and generation config, as `mixload build` copies
from .errors import ConfigError, HeaderError, SourceError, os_error
from .sources import (INDEX, Source, TensorInfo, assemble, parse_header, read_config,
                      read_header, weight_files)

if TYPE_CHECKING:
    from rich.console import Console

    from .plan import Plan

# `org/name` as the Hub spells it; config.py checks first that no such folder exists.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_id(path: str) -> bool:
    """Whether a (normalized) source path is a Hugging Face id rather than a folder."""
    return HUB_ID.fullmatch(path) is not None and ".." not in path


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    revision: str               # as the mix config says (default: main)
    commit: str                 # what it resolved to
    sizes: dict[str, int]       # every file of the repository at `commit` -> bytes ({} offline)

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"


def _offline() -> bool:
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE


@contextmanager
def _hub_errors(name: str, repo: str, revision: str, file: str, mix_file: Path) -> Iterator[None]:
    """huggingface_hub's exceptions -> SourceError naming the source, the file and the fix."""
    from huggingface_hub import constants, errors
    try:   # huggingface_hub >= 2 talks through httpx2, 1.x through httpx
        import httpx2 as httpx
    except ImportError:
        import httpx  # type: ignore[no-redef]

    where = f"{repo}@{revision}: {file}"
    try:
        yield
    except errors.GatedRepoError:
        raise SourceError(f"source {name!r}: {repo} is gated and this token has no access to it",
                          file=where, fix="accept its terms on the repository's page, then log "
                                          "in (`hf auth login`) or set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise SourceError(f"source {name!r}: no repository {repo!r} on {constants.ENDPOINT}, and "
                          f"no folder of that name next to the mix config", file=mix_file,
                          fix="check the id (org/name) or the folder; for a private repository "
                              "log in (`hf auth login`) or set HF_TOKEN") from None
    except errors.RevisionNotFoundError:
        raise SourceError(f"source {name!r}: {repo} has no revision {revision!r}", file=mix_file,
                          fix="use a branch, tag or commit of the repository "
                              "(`revision:`, default main)") from None
    except errors.RemoteEntryNotFoundError:
        raise SourceError(f"source {name!r}: the repository has no file {file!r}", file=where,
                          fix="the repository is incomplete (its index names a missing shard?); "
                              "choose another revision or repository") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        raise SourceError(f"source {name!r}: {file} is not in the local Hugging Face cache "
                          f"({constants.HF_HUB_CACHE})", file=where,
                          fix=f"run `mixload fetch {mix_file}` with network access "
                              "(HF_HUB_OFFLINE unset)") from None
    except (errors.HfHubHTTPError, httpx.HTTPError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"source {name!r}: the hub request failed: {first}", file=where,
                          fix="check the network, HF_ENDPOINT and the token") from None


class _RangeReader:
    """A remote file read through huggingface_hub's session with HTTP Range requests: each
    `read(n)` transfers exactly n bytes (what `parse_header` asks for)."""

    def __init__(self, url: str) -> None:
        self.url, self.pos = url, 0

    def read(self, n: int) -> bytes:
        from huggingface_hub import get_session
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        headers = {**build_hf_headers(), "Range": f"bytes={self.pos}-{self.pos + n - 1}"}
        with get_session().stream("GET", self.url, headers=headers) as r:
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            if r.status_code != 206:   # a full response would be the whole shard
                raise SourceError(f"the server answered a range request with {r.status_code}, "
                                  "not 206 Partial Content", file=self.url,
                                  fix="use an endpoint that supports HTTP Range (HF_ENDPOINT)")
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) >= n:
                    break
        self.pos += min(len(data), n)
        return bytes(data[:n])


def open_hub_source(name: str, repo_id: str, revision: str | None, mix_file: Path) -> Source:
    """A Source for a hub id: cached files from disk; online, the headers of the other shards
    by range requests; offline, their tensors are recorded as uncached."""
    from huggingface_hub import HfApi, hf_hub_download

    rev = revision or "main"
    offline = _offline()
    sizes: dict[str, int] = {}
    if not offline:
        with _hub_errors(name, repo_id, rev, "(repository info)", mix_file):
            info = HfApi().model_info(repo_id, revision=rev, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    with _hub_errors(name, repo_id, rev, "config.json", mix_file):
        # by the revision as written, so the cache records it (refs/) for offline use
        config = Path(hf_hub_download(repo_id, "config.json", revision=rev))
    folder = config.parent    # the snapshot: <cache>/models--org--name/snapshots/<commit>
    hub = HubRepo(repo_id, rev, folder.name, sizes)
    config_data = read_config(folder)
    files: dict[str, str] | list[Path]
    if INDEX in sizes:
        with _hub_errors(name, repo_id, rev, INDEX, mix_file):
            hf_hub_download(repo_id, INDEX, revision=hub.commit)
        files = weight_files(folder)
    elif sizes:
        files = [folder / f for f in sorted(sizes) if f.endswith(".safetensors") and "/" not in f]
        if not files:
            raise SourceError(f"source {name!r}: {hub} has no safetensors weights (pickle "
                              "weights are refused: loading them runs arbitrary code)",
                              file=mix_file, fix="use a repository with safetensors weights")
    elif (folder / INDEX).exists() or any(folder.glob("*.safetensors")):
        files = weight_files(folder)
    else:
        raise SourceError(f"source {name!r}: no weights of {hub} are in the local cache",
                          file=folder, fix=f"run `mixload fetch {mix_file}` with network access")

    # Cached shards are read now. With an index, the others' headers are read only when the
    # plan asks for one of their tensors (online), or never (offline: they stay `uncached`).
    def read(path: Path) -> dict[str, TensorInfo] | None:
        if path.exists():
            return read_header(path)
        if offline or isinstance(files, dict):
            return None
        return _remote_header(name, hub, path, path.relative_to(folder).as_posix(), mix_file)

    src = assemble(name, folder, config_data, files, read,
                   root=folder.parent.parent, hub=hub)   # snapshot files link into ../../blobs
    if not offline and src.uncached:
        src.tensors = _RemoteTensors(src.tensors, src.uncached, name, hub, folder, mix_file)
        src.uncached = {}
    return src


def _remote_header(source: str, hub: HubRepo, path: Path, file: str, mix_file: Path
                   ) -> dict[str, TensorInfo]:
    """The validated header of a shard not in the cache, read by range requests; its entries
    name `path`, where `fetch` will put the shard."""
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(hub.repo_id, file, revision=hub.commit)
    with _hub_errors(source, hub.repo_id, hub.revision, file, mix_file):
        try:
            return parse_header(_RangeReader(url), hub.sizes.get(file, 0), path)
        except HeaderError as exc:   # name the remote file, not a cache path not yet written
            raise HeaderError(f"source {source!r}: {exc.what}", file=f"{hub}: {file} (remote)",
                              tensor=exc.tensor, fix=exc.fix) from None


class _RemoteTensors(dict[str, TensorInfo]):
    """A source's tensors where the header of a shard not in the cache is read (two range
    requests) the first time one of its tensors is looked up: a plan that takes only the
    attention of a checkpoint reads only the headers of the shards that hold attention."""

    def __init__(self, known: dict[str, TensorInfo], pending: dict[str, str], source: str,
                 hub: HubRepo, folder: Path, mix_file: Path) -> None:
        super().__init__(known)
        self.pending, self.source, self.hub = dict(pending), source, hub
        self.folder, self.mix_file = folder, mix_file
        self.by_file: dict[str, list[str]] = {}
        for tensor, file in pending.items():
            self.by_file.setdefault(file, []).append(tensor)

    def _load(self, file: str) -> None:
        header = _remote_header(self.source, self.hub, self.folder / file, file, self.mix_file)
        for tensor in self.by_file.pop(file):
            if tensor not in header:
                raise HeaderError(f"source {self.source!r}: the index puts this tensor in "
                                  f"{file!r}, whose header does not list it",
                                  file=f"{self.hub}: {INDEX}", tensor=tensor,
                                  fix="the index and the shards disagree; use another revision")
            dict.__setitem__(self, tensor, header[tensor])
            del self.pending[tensor]

    def _load_all(self) -> None:
        while self.by_file:
            self._load(next(iter(self.by_file)))

    def get(self, key: str, default: TensorInfo | None = None) -> TensorInfo | None:  # type: ignore[override]
        if key in self.pending:
            self._load(self.pending[key])
        return dict.get(self, key, default)

    def __getitem__(self, key: str) -> TensorInfo:
        if key in self.pending:
            self._load(self.pending[key])
        return dict.__getitem__(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.pending or dict.__contains__(self, key)

    def __iter__(self):  # type: ignore[no-untyped-def]
        self._load_all()
        return dict.__iter__(self)

    def __len__(self) -> int:
        return dict.__len__(self) + len(self.pending)

    def keys(self):  # type: ignore[no-untyped-def]
        self._load_all()
        return dict.keys(self)

    def values(self):  # type: ignore[no-untyped-def]
        self._load_all()
        return dict.values(self)

    def items(self):  # type: ignore[no-untyped-def]
        self._load_all()
        return dict.items(self)


def not_cached(src: Source, names: list[str], mix_file: Path) -> SourceError | None:
    """The error for a plan that needs tensors of shards that are not cached (offline)."""
    files = sorted({src.uncached[n] for n in names if n in src.uncached})
    if not files:
        return None
    return SourceError(f"source {src.name!r} ({src.hub}): {', '.join(files)} holds tensors the "
                       f"plan needs and is not in the local cache", file=src.path / files[0],
                       fix=f"run `mixload fetch {mix_file}` with network access")


def check_cached(plan: Plan) -> None:
    """Raise naming every planned shard that is not on disk yet (before anything reads data)."""
    missing: dict[str, list[str]] = {}
    for name, src in plan.sources.items():
        files = {t.file for a in plan.assignments if a.source == name for t in a.tensors.values()}
        absent = sorted(f.name for f in files if not f.exists())
        if absent:
            missing[f"{name!r} ({src.hub or src.path})"] = absent
    if missing:
        what = "; ".join(f"source {k}: {', '.join(v)}" for k, v in missing.items())
        raise SourceError(f"planned shards are not in the local cache — {what}",
                          file=plan.config.file,
                          fix=f"run `mixload fetch {plan.config.file}` first")


@dataclass
class FetchRow:
    """What `fetch` does for one hub source."""

    source: str
    repo: HubRepo
    files: dict[str, int]       # the files the plan needs -> bytes
    cached: set[str]            # of those, already in the cache

    @property
    def needed_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def download_bytes(self) -> int:
        return sum(n for f, n in self.files.items() if f not in self.cached)

    @property
    def repo_bytes(self) -> int:
        return sum(self.repo.sizes.values())


def fetch_rows(plan: Plan) -> list[FetchRow]:
    """Per hub source: planned shards, config.json and the index; for the base also the
    tokenizer and generation config (what `mixload build` copies)."""
    rows = []
    for name, src in plan.sources.items():
        if src.hub is None:
            continue
        sizes = src.hub.sizes
        needed = {t.file.relative_to(src.path).as_posix() for a in plan.assignments
                  if a.source == name for t in a.tensors.values()}
        needed |= {"config.json", INDEX} & sizes.keys()
        if name == plan.config.base:
            needed |= {f for f in sizes if "/" not in f
                       and any(fnmatch.fnmatch(f, p) for p in SIDE_FILES)}
        files = {f: sizes[f] for f in sorted(needed)}
        rows.append(FetchRow(name, src.hub, files, {f for f in files if (src.path / f).exists()}))
    return rows


def fetch(plan: Plan, dry_run: bool = False) -> list[FetchRow]:
    """Download what `fetch_rows` lists into the Hugging Face cache (atomically, per file, with
    huggingface_hub's progress bars); `dry_run` only reports."""
    from huggingface_hub import hf_hub_download

    if _offline():
        raise ConfigError("mixload fetch downloads, and HF_HUB_OFFLINE is set",
                          file=plan.config.file, fix="unset HF_HUB_OFFLINE (or set it to 0)")
    rows = fetch_rows(plan)
    local = {f for src in plan.sources.values() if src.hub is None
             for f in output.source_folders(src)}
    for row in rows:   # the cache may not overlap a local source (HF_HOME set inside one)
        output.apart(plan.sources[row.source].path.parent.parent, local,
                     what=f"the Hugging Face cache folder of {row.repo.repo_id}",
                     fix="point HF_HOME (or HF_HUB_CACHE) outside every local source folder")
    if not dry_run:
        for row in rows:
            for f in row.files:
                if f not in row.cached:
                    try:
                        with _hub_errors(row.source, row.repo.repo_id, row.repo.revision, f,
                                         plan.config.file):
                            hf_hub_download(row.repo.repo_id, f, revision=row.repo.commit)
                    except OSError as exc:   # disk full, read-only cache, ...
                        raise os_error(exc, f"downloading {f} of {row.repo}",
                                       exc.filename or plan.sources[row.source].path) from None
    return rows


def print_fetch(rows: list[FetchRow], out: Console, dry_run: bool) -> None:
    from rich.table import Table

    from .report import human

    if not rows:
        out.print("no source is given by Hugging Face id: nothing to fetch")
        return
    table = Table(title="mixload fetch" + (" --dry-run (nothing downloaded)" if dry_run else ""))
    for col in ("source", "repository", "files", "needed", "full repository", "share",
                "downloaded" if not dry_run else "to download"):
        table.add_column(col, justify="left" if col in ("source", "repository") else "right")
    for r in rows:
        table.add_row(r.source, f"{r.repo.repo_id}@{r.repo.commit[:12]}",
                      f"{len(r.files)} of {len(r.repo.sizes)}", human(r.needed_bytes),
                      human(r.repo_bytes), f"{r.needed_bytes / max(r.repo_bytes, 1):.0%}",
                      human(r.download_bytes))
    need, full = sum(r.needed_bytes for r in rows), sum(r.repo_bytes for r in rows)
    table.add_row("total", "", "", human(need), human(full), f"{need / max(full, 1):.0%}",
                  human(sum(r.download_bytes for r in rows)), style="bold")
    out.print(table)

