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
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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

    def matches(self, module: str) -> bool:
        if self.exact:
            return module in _exact_names(self.pattern)
        rx = _compiled(self.pattern)   # names may be written with or without `.weight`
        return rx.fullmatch(module) is not None or rx.fullmatch(module + ".weight") is not None


@dataclass(frozen=True)
class MixConfig:
    file: Path
    sources: dict[str, SourceSpec]   # paths already resolved
    base: str
    rules: tuple[NormalizedRule, ...]
    on_conflict: OnConflict
    form: Literal["seed", "rules"]


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


@lru_cache(maxsize=None)
def _exact_names(name: str) -> frozenset[str]:
    return frozenset(strip_suffix(n) for n in _expand_fused(name))


@lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern[str]:
    """One regex for a rule and its fused-name expansions (compiled once: 150k modules)."""
    parts = [p[3:] if p.startswith("re:") else fnmatch.translate(p) for p in _expand_fused(pattern)]
    return re.compile("|".join(f"(?:{p})" for p in parts))


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


def parse(data: Any, file: Path) -> MixConfig:
    """Validate a YAML document (already parsed) and normalize it."""
    if not isinstance(data, dict):
        raise ConfigError("a mix config must be a mapping with `mixed_precision:` (seed form) "
                          "or `sources:` (rule form)", file=file)
    try:
        if "mixed_precision" in data:
            return _normalize_seed(SeedForm.model_validate(data).mixed_precision, file)
        return _normalize_rules(RuleForm.model_validate(data), file)
    except ValidationError as exc:
        raise _validation_error(exc, file) from None


def _check_pattern(rule: NormalizedRule, file: Path) -> None:
    if rule.pattern.startswith("re:"):
        try:
            re.compile(rule.pattern[3:])
        except re.error as exc:
            raise ConfigError(f"invalid regex: {exc}", file=file, rule=rule.origin,
                              fix="escape dots as \\\\. in YAML double quotes") from None


def _normalize_rules(form: RuleForm, file: Path) -> MixConfig:
    specs = {n: s if isinstance(s, SourceSpec) else SourceSpec(path=s)
             for n, s in form.sources.items()}
    specs = {n: s.model_copy(update={"path": _resolve_path(s.path, file.parent)})
             for n, s in specs.items()}
    for n, s in specs.items():
        if s.revision and not is_hub_id(s.path):
            raise ConfigError(f"sources.{n}.revision is set but {s.path} is a local folder",
                              file=file, fix="revision applies to Hugging Face ids only; remove it")
    rules = tuple(NormalizedRule(r.match, r.use, f"rules[{i}]: match {r.match!r} -> {r.use}")
                  for i, r in enumerate(form.rules))
    for r in rules:
        _check_pattern(r, file)
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


def load(path: str | os.PathLike[str]) -> MixConfig:
    """Read and validate a mix YAML; every problem is a ConfigError naming the file and key."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("mix config not found", file=file, fix="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"can't read the mix config: {exc}", file=file) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML: {exc}", file=file, fix="fix the YAML syntax") from None
    return parse(data, file)


def json_schema() -> str:
    """JSON Schema of both forms, for editors (`mixload schema`)."""
    schema = {"title": "mixload mix config", "anyOf": [SeedForm.model_json_schema(),
                                                        RuleForm.model_json_schema()]}
    return json.dumps(schema, indent=2)
