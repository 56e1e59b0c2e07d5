"""The mix YAML: the seed form (`mixed_precision:`) and the rule form, normalized to one `MixConfig`.

Seed form (accepted verbatim from the seed documents):
    mixed_precision: {fp16_path, fp8_path, gptq_int4_path, awq_int4_path, int4_path,
                      base_model_path, weight_mapping: {name: fp16|fp8|gptq_int4|awq_int4|int4}}
Rule form:
    sources: {name: path | {path, format, revision}}, base: name, rules: [{match, use}], on_conflict
A path is a folder, or a Hugging Face id (`org/name`) when no such folder exists (core/hub.py).
"""
from __future__ import annotations

import fnmatch
import gc
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from .errors import ConfigError
from .hub import is_hub_id

OnConflict = Literal["error", "promote", "demote"]
SEED_PRECISIONS = ("fp16", "fp8", "gptq_int4", "awq_int4", "int4")
SourceFormat = Literal["bf16", "fp16", "fp8", "gptq", "awq", "compressed-tensors"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    path: str = Field(description="checkpoint folder (relative paths are relative to the YAML), "
                                  "or a Hugging Face id `org/name` when no such folder exists")
    format: SourceFormat | None = Field(
        None, description="expected format; checked against the checkpoint's config.json")
    revision: str | None = Field(None, description="hub ids only: branch, tag or commit "
                                                   "(default: main)")


class Rule(_Strict):
    match: str = Field(description="glob over module names, or 're:' + a regex (full match)")
    use: str = Field(description="a source name")


class RuleForm(_Strict):
    sources: dict[str, str | SourceSpec] = Field(min_length=1)
    base: str | None = Field(None, description="model config + every module no rule claims "
                                               "(default: the first source)")
    rules: list[Rule] = []
    on_conflict: OnConflict = "error"

    @model_validator(mode="after")
    def _names_exist(self) -> "RuleForm":
        if self.base is not None and self.base not in self.sources:
            raise ValueError(f"base {self.base!r} is not a source; sources: {sorted(self.sources)}")
        for i, rule in enumerate(self.rules):
            if rule.use not in self.sources:
                raise ValueError(f"rules[{i}].use {rule.use!r} is not a source; "
                                 f"sources: {sorted(self.sources)}")
        return self


SeedPrecision = Literal["fp16", "fp8", "gptq_int4", "awq_int4", "int4"]


class SeedMixedPrecision(_Strict):
    fp16_path: str | None = None
    fp8_path: str | None = None
    gptq_int4_path: str | None = None
    awq_int4_path: str | None = None
    int4_path: str | None = None
    base_model_path: str | None = None
    weight_mapping: dict[str, SeedPrecision] = {}
    # Not in the seed; the seed's own examples split MoE layers (expert 0 int4, the rest fp8),
    # so its default keeps every fused group in its most precise member's format, with a warning.
    on_conflict: OnConflict = "promote"

    @model_validator(mode="after")
    def _paths_for_mapping(self) -> "SeedMixedPrecision":
        if not any(getattr(self, f"{p}_path") for p in SEED_PRECISIONS) and not self.base_model_path:
            raise ValueError("no *_path is set: give at least one of "
                             + ", ".join(f"{p}_path" for p in SEED_PRECISIONS))
        for name, precision in self.weight_mapping.items():
            if not getattr(self, f"{precision}_path"):
                raise ValueError(f"weight_mapping[{name!r}] uses {precision!r} but "
                                 f"{precision}_path is not set")
        return self


class SeedForm(_Strict):
    mixed_precision: SeedMixedPrecision


@dataclass(frozen=True)
class NormalizedRule:
    pattern: str       # glob, 're:' regex, or an exact name (seed weight_mapping)
    use: str
    origin: str        # where the user wrote it, for `explain` and error messages
    exact: bool = False

    @cached_property
    def names(self) -> frozenset[str] | None:
        """The module names the rule matches when it spells them out (a dict lookup), else None."""
        if self.exact:
            return frozenset(strip_suffix(n) for n in _expand_fused(self.pattern))
        if not _is_literal(self.pattern):
            return None
        # a glob without wildcards matches itself, as a module or as its `.weight` tensor
        return frozenset(n2 for n in _expand_fused(self.pattern)
                         for n2 in (n, n.removesuffix(".weight")))

    @cached_property
    def regexes(self) -> tuple[re.Pattern[str], ...]:
        """One compiled regex per fused-name expansion, each on its own so that a named group
        or a leading inline flag like (?i) stays valid."""
        return tuple(re.compile(p[3:] if p.startswith("re:") else fnmatch.translate(p))
                     for p in _expand_fused(self.pattern))

    def matches(self, module: str) -> bool:
        if self.names is not None:
            return module in self.names
        # names may be written with or without `.weight`
        return any(rx.fullmatch(module) is not None or rx.fullmatch(module + ".weight") is not None
                   for rx in self.regexes)


class RuleIndex:
    """First match wins, without trying every rule for every module: spelled-out names are one
    dict lookup, and only the pattern rules written before the first name hit are tried, in
    order (18k seed names or 100k rules against 37k modules)."""

    def __init__(self, rules: tuple[NormalizedRule, ...]) -> None:
        self.rules = rules
        self.by_name: dict[str, list[int]] = {}     # module -> indices of the rules naming it
        self.patterns: list[int] = []
        for i, r in enumerate(rules):
            if r.names is None:
                self.patterns.append(i)
            else:
                for n in r.names:
                    self.by_name.setdefault(n, []).append(i)

    def first(self, module: str) -> int | None:
        """Index of the first rule that matches `module`, or None."""
        named = self.by_name.get(module)
        stop = named[0] if named else len(self.rules)
        for i in self.patterns:
            if i >= stop:
                break
            if self.rules[i].matches(module):
                return i
        return named[0] if named else None

    def naming(self, module: str) -> list[int]:
        """Indices of every rule that names `module` outright, in order."""
        return self.by_name.get(module, [])


@dataclass(frozen=True)
class MixConfig:
    file: Path
    sources: dict[str, SourceSpec]   # paths already resolved
    base: str
    rules: tuple[NormalizedRule, ...]
    on_conflict: OnConflict
    form: Literal["seed", "rules"]

    @cached_property
    def index(self) -> RuleIndex:
        return RuleIndex(self.rules)


TINY = "tiny:"   # a source like `tiny:qwen3-moe/gptq-int4`: core/tiny_family.py

# Engine-fused names a user may write; the checkpoint stores the parts.
FUSED_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
TENSOR_SUFFIXES = ("weight", "bias", "qweight", "qzeros", "scales", "g_idx", "weight_scale",
                   "weight_scale_inv", "input_scale", "weight_packed", "weight_shape",
                   "weight_zero_point", "weight_g_idx")


def _expand_fused(pattern: str) -> list[str]:
    for fused, parts in FUSED_NAMES.items():
        if fused in pattern:
            return [q for part in parts for q in _expand_fused(pattern.replace(fused, part))]
    return [pattern]


def strip_suffix(name: str) -> str:
    """A checkpoint tensor name without its tensor suffix: `x.q_proj.weight` -> `x.q_proj`."""
    head, _, tail = name.rpartition(".")
    return head if head and tail in TENSOR_SUFFIXES else name


def _is_literal(pattern: str) -> bool:
    return not (pattern.startswith("re:") or "*" in pattern or "?" in pattern or "[" in pattern)


def compile_rule(rule: NormalizedRule, where: str, file: object) -> NormalizedRule:
    """Compile one rule now, so a bad pattern is a ConfigError naming it, not a traceback mid-plan."""
    if rule.names is not None:
        return rule    # a spelled-out name: nothing to compile
    try:
        rule.regexes   # compiles and caches them
    except (re.error, RecursionError, OverflowError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        fix = ("put inline flags at the very start (re:(?i)model\\..*) or scope them: (?i:...)"
               if "global flags" in why else
               "fix the regex (Python `re` syntax, full match; in YAML double quotes write \\\\. "
               "for a literal dot), or write a glob such as '*.mlp.experts.*'")
        raise ConfigError(f"invalid regex in {where}: {why}", file=file, rule=rule.origin,
                          fix=fix) from None
    return rule


def probe(name: str, file: object) -> NormalizedRule:
    """What `mixload explain NAME` matches with: a module or tensor name, a glob, or re:regex."""
    return compile_rule(NormalizedRule(name, "", f"explain {name!r}", exact=_is_literal(name)),
                        f"the name {name!r}", file)


def _resolve_path(raw: str, yaml_dir: Path) -> str:
    if raw.startswith(TINY):   # the embedded tiny model family, made on first use
        from .tiny_family import resolve
        return str(resolve(raw.removeprefix(TINY)))
    if is_hub_id(raw) and not (yaml_dir / raw).exists():
        return raw   # stays an id: core/hub.py resolves it through the Hugging Face cache
    p = Path(os.path.expandvars(os.path.expanduser(raw)))
    return str(p if p.is_absolute() else (yaml_dir / p))


def _validation_error(exc: ValidationError, file: Path) -> ConfigError:
    lines = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "literal_error":
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{key}: {msg}")
    return ConfigError("invalid mix config:\n  " + "\n  ".join(lines), file=file,
                       fix="see `mixload schema` for every key and allowed value")


_START = ("start it with `sources:` and `rules:` (rule form) or `mixed_precision:` (seed form); "
          "`mixload schema` lists every key, configs/ has examples")


def _yaml_kind(data: object) -> str:
    return {list: "list", str: "string", bool: "boolean"}.get(type(data), f"{type(data).__name__} value")


def parse(data: Any, file: Path) -> MixConfig:
    """Validate a YAML document (already parsed) and normalize it."""
    if data is None:
        raise ConfigError("the mix config is empty", file=file, fix=_START)
    if not isinstance(data, dict):
        raise ConfigError(f"a mix config must be a mapping, not a {_yaml_kind(data)}", file=file,
                          fix=_START)
    try:
        if "mixed_precision" in data:
            return _normalize_seed(SeedForm.model_validate(data).mixed_precision, file)
        return _normalize_rules(RuleForm.model_validate(data), file)
    except ValidationError as exc:
        raise _validation_error(exc, file) from None


def _normalize_rules(form: RuleForm, file: Path) -> MixConfig:
    specs = {n: s if isinstance(s, SourceSpec) else SourceSpec(path=s)
             for n, s in form.sources.items()}
    specs = {n: s.model_copy(update={"path": _resolve_path(s.path, file.parent)})
             for n, s in specs.items()}
    for n, s in specs.items():
        if s.revision and not is_hub_id(s.path):
            raise ConfigError(f"sources.{n}.revision is set but {s.path} is a local folder",
                              file=file, fix="revision applies to Hugging Face ids only; remove it")
    rules = tuple(compile_rule(NormalizedRule(r.match, r.use, f"rules[{i}]: match {r.match!r} -> {r.use}"),
                               f"rule {i + 1} of `rules:`", file)
                  for i, r in enumerate(form.rules))
    return MixConfig(file, specs, form.base or next(iter(specs)), rules, form.on_conflict, "rules")


# What each seed precision key promises about its checkpoint (fp16 and int4 accept several).
_SEED_FORMAT: dict[str, SourceFormat] = {"fp8": "fp8", "gptq_int4": "gptq", "awq_int4": "awq"}


def _normalize_seed(seed: SeedMixedPrecision, file: Path) -> MixConfig:
    specs: dict[str, SourceSpec] = {}
    for p in SEED_PRECISIONS:
        if raw := getattr(seed, f"{p}_path"):
            specs[p] = SourceSpec(path=_resolve_path(raw, file.parent), format=_SEED_FORMAT.get(p))
    base = None
    if seed.base_model_path:
        base_path = _resolve_path(seed.base_model_path, file.parent)
        base = next((n for n, s in specs.items() if _same_path(s.path, base_path)), None)
        if base is None:
            specs["base"] = SourceSpec(path=base_path)
            base = "base"
    # The seed's loader starts from the FP8 model to avoid OOM, else the first path given.
    base = base or ("fp8" if "fp8" in specs else next(iter(specs)))
    rules = tuple(NormalizedRule(name, p, f"weight_mapping[{name!r}] = {p}", exact=True)
                  for name, p in seed.weight_mapping.items())
    return MixConfig(file, specs, base, rules, seed.on_conflict, "seed")


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cycle collector: loading or planning makes hundreds of thousands of small
    acyclic objects, which it would rescan over and over (measured: 2/3 of loading 100k rules,
    half of a 235B plan) and can free nothing."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


# The mix YAML loader ------------------------------------------------------------------------

MAX_DEPTH = 32        # a mix config is 4 levels deep (top, `rules:`, one rule, its `match:`)
ALIAS_FLOOR = 1000    # nodes aliases may add beyond the file's own size (an anchor reused a few times)
# libyaml parses ~4x faster (a 100k-rule config); the composer above it is always PyYAML's own
# Python one, so depth and aliases are checked as the nodes are made, whichever parser runs.
_PARSER: tuple[type, ...] = ((yaml.cyaml.CParser,) if yaml.__with_libyaml__ else
                             (yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser))


class StrictLoader(Composer, *_PARSER, SafeConstructor, Resolver):  # type: ignore[misc]
    """PyYAML's safe loader, refusing what it would let through silently: a key written twice
    (PyYAML keeps the last), aliases that expand far beyond the file (a 1 KB "billion laughs"
    makes 10^9 nodes) or that contain themselves, and nesting deep enough to exhaust the stack."""

    def __init__(self, text: str, file: Path) -> None:
        _PARSER[0].__init__(self, text)   # CParser or Reader takes the text
        for base in _PARSER[1:]:
            base.__init__(self)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.file = file
        self.depth = 0
        self.open: set[str] = set()       # anchors of the nodes being composed
        self.sizes: dict[int, int] = {}   # id(node) -> nodes it stands for, aliases expanded
        self.expanded = 0                 # nodes the aliases so far added
        self.budget = len(text) + ALIAS_FLOOR

    def compose_node(self, parent: Node | None, index: object) -> Node:
        event = self.peek_event()
        if self.depth >= MAX_DEPTH:
            raise ConfigError(f"the YAML is nested more than {MAX_DEPTH} levels deep (line "
                              f"{event.start_mark.line + 1}); a mix config has 4",
                              file=self.file, fix="flatten it: `rules:` is a list of {match, use} "
                                                  "mappings")
        anchor = event.anchor
        if isinstance(event, AliasEvent):
            if anchor in self.open:
                raise ConfigError(f"alias *{anchor} (line {event.start_mark.line + 1}) is used "
                                  "inside its own anchor: the structure would be infinite",
                                  file=self.file,
                                  fix=f"use *{anchor} only after the value anchored &{anchor} ends")
            node = super().compose_node(parent, index)
            self.expanded += self._size(node) - 1
            if self.expanded > self.budget:
                raise ConfigError(
                    f"the YAML's aliases expand to more than {self.budget} values (at line "
                    f"{event.start_mark.line + 1}), far more than its {self.budget - ALIAS_FLOOR} "
                    "characters hold: an alias bomb", file=self.file,
                    fix="write the values out, or reuse an anchor (&name / *name) only a few times")
            return node
        if anchor is not None:
            self.open.add(anchor)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1
            self.open.discard(anchor)

    def _size(self, node: Node) -> int:
        """Nodes `node` stands for with its aliases expanded; memoized, so a bomb costs its size
        in digits, not in nodes."""
        stack = [node]
        while stack:
            n = stack[-1]
            if id(n) in self.sizes:
                stack.pop()
                continue
            kids = (() if isinstance(n, ScalarNode) else n.value if isinstance(n, SequenceNode)
                    else [x for pair in n.value for x in pair])
            todo = [k for k in kids if id(k) not in self.sizes]
            if todo:
                stack += todo
                continue
            self.sizes[id(n)] = 1 + sum(self.sizes[id(k)] for k in kids)
            stack.pop()
        return self.sizes[id(node)]

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, IndexError, AttributeError, TypeError, OverflowError) as exc:
            # PyYAML's own constructors on a value they can't make: `!!int`, `2024-13-45`
            tag = node.tag.removeprefix("tag:yaml.org,2002:")
            what = repr(node.value) if isinstance(node, ScalarNode) else "the value"
            raise ConfigError(f"line {node.start_mark.line + 1}: {what} is not a valid {tag} "
                              f"({exc})", file=self.file,
                              fix="quote the value to make it a string, or fix it") from None

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue   # `<<: *defaults` keys are meant to be overridden; others are unhashable
            key = self.construct_object(key_node)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue
            if first is not key_node:
                raise ConfigError(
                    f"key {key!r} is written twice in one mapping (lines "
                    f"{first.start_mark.line + 1} and {key_node.start_mark.line + 1}); YAML keeps "
                    "only the last, so the first would be silently ignored", file=self.file,
                    fix=f"keep one {key!r}: merge the two into one, or delete the one you don't mean")
        return super().construct_mapping(node, deep)


def load(path: str | os.PathLike[str]) -> MixConfig:
    """Read and validate a mix YAML; every problem is a ConfigError naming the file and key."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError("mix config not found", file=file, fix="check the path") from None
    except IsADirectoryError:
        raise ConfigError("the mix config is a folder", file=file,
                          fix="give the mix YAML file itself") from None
    except OSError as exc:
        raise ConfigError(f"can't read the mix config: {exc.strerror or exc}", file=file,
                          fix="check the path and its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"the mix config is not UTF-8 text: byte 0x{raw[exc.start]:02x} at line "
                          f"{line}", file=file,
                          fix="save it as UTF-8 (your editor's 'save with encoding')") from None
    loader = StrictLoader(text, file)
    with gc_paused():
        try:
            data = loader.get_single_data()
        except yaml.YAMLError as exc:
            raise ConfigError(f"malformed YAML: {exc}", file=file,
                              fix="fix the YAML syntax") from None
        finally:
            loader.dispose()
        return parse(data, file)


def json_schema() -> str:
    """JSON Schema of both forms, for editors (`mixload schema`)."""
    schema = {"title": "mixload mix config", "anyOf": [SeedForm.model_json_schema(),
                                                        RuleForm.model_json_schema()]}
    return json.dumps(schema, indent=2)
