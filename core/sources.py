"""A checkpoint folder, read from its config.json, index and safetensors headers — never tensor data."""
from __future__ import annotations

import json
import os
import struct
from math import prod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, NamedTuple

import orjson

from .errors import HeaderError, SourceError
from .formats import DTYPE_BYTES, Unquantized, WeightFormat, detect, torch_dtype_name

if TYPE_CHECKING:
    from .hub import HubRepo

INDEX = "model.safetensors.index.json"
MAX_HEADER = 100_000_000        # the safetensors library's own limit (MAX_HEADER_SIZE)
METADATA = "__metadata__"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class TensorInfo(NamedTuple):
    """One header entry (a tuple: 150k of them are made per large model, so creation is cheap)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int     # absolute byte offset of the data in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header, reading exactly 8 + header-length bytes."""
    try:
        with open(path, "rb") as f:
            return parse_header(f, os.fstat(f.fileno()).st_size, path)
    except IsADirectoryError:
        raise SourceError("this shard is a folder, not a safetensors file", file=path,
                          fix="remove or rename the folder and download the shard it stands "
                              "for (or re-download the checkpoint)") from None
    except FileNotFoundError:
        if path.is_symlink():
            raise SourceError(f"this shard is a dangling symlink (to {os.readlink(path)})",
                              file=path, fix="the file it points to is gone (an interrupted "
                                             "download or a cleaned cache): re-download the "
                                             "shard") from None
        raise SourceError("the index names this shard and it is missing", file=path,
                          fix="download the missing shard (or re-download the checkpoint)") from None
    except OSError as exc:
        raise SourceError(f"can't read: {exc.strerror}", file=path,
                          fix="check the file's permissions and the disk") from None


def parse_header(f: BinaryIO, size: int, path: Path) -> dict[str, TensorInfo]:
    """Validate the header of a `size`-byte safetensors file read from `f` (a local file, or a
    remote one read by range requests) as strictly as the safetensors library does (its Rust
    `Metadata::validate`) and a little more, so that what passes here safetensors and the
    engines load. `path` names the file in the entries and in errors."""
    head = f.read(8)
    if len(head) < 8:
        raise HeaderError("truncated safetensors file: no 8-byte header length", file=path,
                          fix="re-download or re-convert this shard")
    (n,) = struct.unpack("<Q", head)
    if n == 0 or n > MAX_HEADER or 8 + n > size:
        raise HeaderError(f"header length {n} does not fit the file ({size} bytes)",
                          file=path, fix="the file is truncated or not safetensors")
    raw = f.read(n)
    if len(raw) < n:
        raise HeaderError(f"truncated header: {len(raw)} of {n} bytes", file=path,
                          fix="the file is truncated; re-download it")
    try:
        header = orjson.loads(raw)   # serde_json's grammar: UTF-8, no NaN, no lone surrogates
    except orjson.JSONDecodeError as exc:
        raise HeaderError(f"header is not valid JSON: {exc}", file=path,
                          fix="the file is corrupt; re-download it") from None
    if not isinstance(header, dict):
        raise HeaderError(f"header is a JSON {_json_type(header)}, not an object", file=path,
                          fix="the file is not safetensors; re-download it")
    tensors, keys = _entries(path, header, 8 + n, size - 8 - n)
    # orjson keeps the last of two equal keys. Each key is followed by a colon, so as many
    # colons as parsed keys means no key was written twice; otherwise (a colon inside a
    # string, or a repeated key) the exact, slower check decides.
    if raw.count(b":") != keys:
        _check_unique(raw, path)
    _check_layout(path, tensors.values(), 8 + n, size)
    return tensors


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), "number")


def _entries(path: Path, header: dict[str, Any], start: int, data_size: int
             ) -> tuple[dict[str, TensorInfo], int]:
    """The tensors, and how many object keys the header holds (-1: not counted)."""
    # Hot loop (150k tensors for a 235B model in well under a second): the fast path only
    # computes; anything odd is re-examined by _bad_entry for a precise message.
    tensors = {}
    keys = len(header)
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = prod(shape)   # an int only if every dim is an int or a bool
            ok = (type(shape) is list and type(numel) is int and bool not in map(type, shape)
                  and (not shape or min(shape) >= 0)
                  and type(begin) is int and type(end) is int and 0 <= begin <= end <= data_size
                  and end - begin == numel * DTYPE_BYTES[dtype] and (numel or _fits(shape, dtype)))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            if name != METADATA:
                raise _bad_entry(path, name, entry, data_size)
            _check_metadata(path, entry)
            keys += len(entry or ())
            continue
        # an extra field may nest objects: leave those to the exact check
        keys = keys + 3 if len(entry) == 3 and keys >= 0 else -1
        tensors[name] = TensorInfo(name, path, dtype, tuple(shape), start + begin, start + end)
    return tensors, keys


class _Pairs(list):
    """A JSON object as its (key, value) pairs (a JSON array stays a plain list)."""


def _check_unique(raw: bytes, path: Path) -> None:
    """Refuse a tensor name, an entry field or a `__metadata__` key written twice (safetensors
    silently keeps the last tensor of a name and refuses a repeated field)."""
    try:   # objects as lists of pairs, so a repeated key stays visible
        top = json.loads(raw, object_pairs_hook=_Pairs)
    except RecursionError:
        raise HeaderError("header is nested too deeply", file=path,
                          fix="the file is corrupt; re-download it") from None
    fix = "the file was written by a broken tool; re-download or re-convert it"
    seen: set[str] = set()
    for name, entry in top:
        if name in seen:
            raise HeaderError(f"the header lists {name!r} twice (safetensors would keep only "
                              "the last one)", file=path, tensor=name, fix=fix)
        seen.add(name)
        fields = [k for k, _ in entry] if isinstance(entry, _Pairs) else []
        twice = [k for k in fields if fields.count(k) > 1]
        if twice:
            raise HeaderError(f"{'__metadata__' if name == METADATA else 'the entry'} writes "
                              f"{twice[0]!r} twice", file=path,
                              tensor=None if name == METADATA else name, fix=fix)


def _fits(shape: list[int], dtype: str) -> bool:
    """Whether the size of `shape`'s nonzero dims fits 64 bits: safetensors requires it of every
    partial product, so a zero dim may not hide an overflowing one."""
    return prod(d for d in shape if d) * DTYPE_BYTES[dtype] * 8 < 2**64


def _check_metadata(path: Path, value: Any) -> None:
    """`__metadata__`: absent, null, or an object of string -> string (safetensors' rule)."""
    fix = "the file was written by a broken tool; re-download or re-convert it"
    if value is not None and not isinstance(value, dict):
        raise HeaderError(f"__metadata__ is a JSON {_json_type(value)}, not an object of "
                          "string -> string", file=path, fix=fix)
    for key, v in (value or {}).items():
        if not isinstance(v, str):
            raise HeaderError(f"__metadata__[{key!r}] is a JSON {_json_type(v)}, not a string",
                              file=path, fix=fix)


def _bad_entry(path: Path, name: str, entry: Any, data_size: int) -> HeaderError:
    def bad(why: str) -> HeaderError:
        return HeaderError(f"bad header entry: {why}", file=path, tensor=name,
                           fix="the file is corrupt or was written by a broken tool")
    if not isinstance(entry, dict):
        return bad(f"a JSON {_json_type(entry)}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        return bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return bad(f"shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets)):
        return bad(f"data_offsets {offsets!r} is not [begin, end] (two integers)")
    begin, end = offsets
    if not 0 <= begin <= end:
        return bad(f"data_offsets {offsets} run backwards")
    if end > data_size:
        return bad(f"data_offsets {offsets} end past the file's data ({data_size} bytes)")
    if not _fits(shape, dtype):
        return bad(f"{dtype}{shape}: the product of its nonzero dims overflows 64 bits")
    return bad(f"{dtype}{shape} needs {prod(shape) * DTYPE_BYTES[dtype]} bytes, "
               f"data_offsets {offsets} give {end - begin}")


def _check_layout(path: Path, tensors: Any, start: int, size: int) -> None:
    """The data must be the tensors back to back in offset order, from the end of the header
    (`start`) to the end of the file (`size`): no overlap, no hole, nothing after the last
    tensor (safetensors refuses all three)."""
    fix = "the file is corrupt or was written by a broken tool; re-download or re-convert it"
    at, last = start, None
    for begin, end, name in sorted((t.begin, t.end, t.name) for t in tensors):
        if begin < at:
            raise HeaderError(f"tensors {last!r} and {name!r} overlap in the file", file=path,
                              tensor=name, fix=fix)
        if begin > at:
            raise HeaderError(f"a hole: {begin - at} bytes before this tensor's data belong to "
                              "no tensor", file=path, tensor=name, fix=fix)
        at, last = end, name
    if at < size:
        raise HeaderError(f"{size - at} bytes after the last tensor's data belong to no tensor",
                          file=path, tensor=last, fix=fix)


@dataclass
class Source:
    """One checkpoint: its config, its quantized formats and every tensor's header entry."""

    name: str
    path: Path
    config: dict[str, Any]
    formats: list[WeightFormat]        # quantized formats its quantization_config declares
    dtype: str                         # dtype of its unquantized tensors (config torch_dtype)
    tensors: dict[str, TensorInfo] = field(repr=False)
    hub: HubRepo | None = None         # set for a source given by Hugging Face id (core/hub.py)
    # tensor -> shard, for shards whose header could not be read (offline, not in the cache)
    uncached: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def files(self) -> set[Path]:
        return {t.file for t in self.tensors.values()}

    def module_format(self, prefix: str) -> WeightFormat | None:
        """How this checkpoint stores the linear module `prefix` (None if it does not have it)."""
        for fmt in self.formats:
            key = self.tensors.get(f"{prefix}.{fmt.key}")
            if key is not None and fmt.is_stored_as(key.dtype):
                return fmt
        weight = self.tensors.get(f"{prefix}.weight")
        if weight is not None and Unquantized(dtype=self.dtype).is_stored_as(weight.dtype):
            return Unquantized(dtype=weight.dtype)  # type: ignore[arg-type]
        return None

    def family(self) -> set[str]:
        """Names a user may give as this source's `format:` (see config.SourceFormat)."""
        if not self.formats:
            return {"bf16" if self.dtype == "BF16" else "fp16" if self.dtype == "F16" else "fp32"}
        names = {f.name for f in self.formats}
        out = {"gptq" if "gptq" in names else "", "awq" if "awq" in names else ""}
        if names & {"fp8", "ct-fp8"}:
            out.add("fp8")
        if names & {"ct-fp8", "ct-int4"}:
            out.add("compressed-tensors")
        return out - {""}


def _inside(folder: Path, entry: str, what: str, root: Path) -> Path:
    """Resolve an index/shard entry, refusing anything that escapes the folder (symlinks may
    point anywhere under `root`: a Hugging Face cache snapshot links into its repo's blobs/)."""
    if not entry or os.path.isabs(entry) or ".." in Path(entry).parts:
        raise SourceError(f"{what} {entry!r} points outside the checkpoint folder", file=folder,
                          fix="an index may only name files inside its own folder")
    target = folder / entry
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(target)]) != real_root:
        raise SourceError(f"{what} {entry!r} is a symlink out of the checkpoint folder",
                          file=target, fix="copy the file into the folder instead of linking")
    return target


def _read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())   # a 235B index maps ~150k names
    except FileNotFoundError:
        raise SourceError("missing file", file=path,
                          fix="a checkpoint folder needs config.json and safetensors weights") from None
    except IsADirectoryError:
        raise SourceError("a folder where a JSON file belongs", file=path,
                          fix=f"replace the folder with the checkpoint's {path.name}") from None
    except OSError as exc:
        raise SourceError(f"can't read: {exc.strerror}", file=path,
                          fix="check the file's permissions and the disk") from None
    except orjson.JSONDecodeError as exc:
        raise SourceError(f"not valid JSON: {exc}", file=path,
                          fix=f"the file is damaged or truncated: re-download {path.name}") from None


def weight_files(folder: Path) -> dict[str, list[str]] | list[Path]:
    """The index's weight_map (tensor -> file) if there is one, else the shard files."""
    index = folder / INDEX
    if index.exists():
        data = _read_json(index)
        fix = (f"re-download {INDEX} (or delete it: without an index every *.safetensors "
               "file of the folder is read)")
        if not isinstance(data, dict):
            raise SourceError(f"the index is a JSON {_json_type(data)}, not an object with a "
                              "weight_map", file=index, fix=fix)
        wmap = data.get("weight_map")
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise SourceError("the index has no weight_map of tensor -> file", file=index, fix=fix)
        return wmap
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise SourceError(f"only pickle weights found ({', '.join(pickles[:3])}): refused, "
                          "loading a pickle runs arbitrary code", file=folder,
                          fix="convert the checkpoint to safetensors (e.g. with transformers' "
                              "save_pretrained(safe_serialization=True))")
    raise SourceError("no safetensors weights found", file=folder,
                      fix="point the source at a folder with model.safetensors or an index")


def open_source(name: str, path: str | os.PathLike[str]) -> Source:
    """Read a checkpoint folder's config.json, index and safetensors headers (no tensor data)."""
    folder = Path(path)
    if folder.is_file():
        raise SourceError(f"source {name!r} is a file, not a checkpoint folder", file=folder,
                          fix=f"give the folder that holds config.json and the weights "
                              f"({folder.parent}?), not a file in it")
    if not folder.is_dir():
        raise SourceError(f"source {name!r}: folder does not exist", file=folder,
                          fix="check the path (in the mix config or on the command line)")
    config = read_config(folder)
    return assemble(name, folder, config, weight_files(folder))


def read_config(folder: Path) -> dict[str, Any]:
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise SourceError(f"config.json is a JSON {_json_type(config)}, not an object",
                          file=folder / "config.json",
                          fix="a model's config.json is an object (architectures, hidden_size, "
                              "...): re-download it")
    return config


# Reads one shard's header; None when it is neither on disk nor readable (offline).
HeaderReader = Callable[[Path], "dict[str, TensorInfo] | None"]


def assemble(name: str, folder: Path, config: dict[str, Any], files: dict[str, str] | list[Path],
             read: HeaderReader = read_header, root: Path | None = None,
             hub: HubRepo | None = None) -> Source:
    """A Source from `folder`'s config and the headers of `files` (an index's weight_map, or
    the shards), each read with `read`."""
    formats = detect(config.get("quantization_config"), folder / "config.json")
    root = root or folder
    tensors: dict[str, TensorInfo] = {}
    uncached: dict[str, str] = {}
    if isinstance(files, dict):
        headers: dict[str, dict[str, TensorInfo] | None] = {}
        for tensor, entry in files.items():
            if entry not in headers:
                headers[entry] = read(_inside(folder, entry, "index entry", root))
            header = headers[entry]
            if header is None:
                uncached[tensor] = entry
                continue
            if tensor not in header:
                raise HeaderError(f"the index puts this tensor in {entry!r}, whose header "
                                  "does not list it", file=folder / INDEX, tensor=tensor,
                                  fix="the index and the shards disagree; re-download both")
            tensors[tensor] = header[tensor]
    else:
        for shard in files:
            for tensor, info in (read(_inside(folder, shard.name, "shard", root)) or {}).items():
                if tensor in tensors:
                    raise HeaderError(f"tensor is in two shards: {tensors[tensor].file.name} "
                                      f"and {shard.name}", file=folder, tensor=tensor,
                                      fix="remove the stale shard or add an index")
                tensors[tensor] = info
    return Source(name, folder, config, formats, torch_dtype_name(config), tensors, hub, uncached)
