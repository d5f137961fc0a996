"""Typed configuration: defaults in code, YAML per environment, `--set key=value` on the command line.

Every job describes its settings as a pydantic model built on `StrictModel`; an unknown key or a bad value
is a `ConfigError` naming the key (`--set scorer.max_tokens_per_batch=abc` ->
"config key `scorer.max_tokens_per_batch`: Input should be a valid integer ...").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, TypeVar

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.core.errors import ConfigError

# Keys whose values are secrets or endpoints: never logged, never written to summaries, never hashed.
SECRET_KEYS = frozenset(
    {"storage_options", "key", "secret", "token", "password", "aws_secret_access_key"}
)


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


C = TypeVar("C", bound=StrictModel)


def _set_nested(data: dict, dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"`--set {dotted_key}=...`: `{part}` is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> dict:
    """`["scorer.device=cpu", "top_k=10"]` -> nested dict. Values are parsed as YAML scalars/lists."""
    data: dict = {}
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--set expects key=value (for example `--set top_k=10`), got {item!r}"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_nested(data, key, value)
    return data


def merge_dicts(base: dict, extra: dict) -> dict:
    """`extra` laid over `base`, section by section (nested dicts merge, other values replace)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str) -> dict:
    try:
        with fsspec.open(path, "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path!r} not found; pass an existing YAML file to --config"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path!r} must hold a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _accepts(model: type[BaseModel], parts: list[str]) -> bool:
    """Whether `model` has the dotted key `parts` (a section's keys below a section)."""
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        sub = _model_of(field.annotation)
        if sub is None:
            return i == len(parts) - 1
        model = sub
    return True


def _nested_key_hint(section: Any, key: str, value: Any) -> tuple[str, str] | None:
    """The full key an unknown key was probably meant as: the same key inside one of this section's sections
    (`scorer.max_tokens_per_batch` -> `rerank.scorer.max_tokens_per_batch` in the jobs that run a rerank step):
    (the key as typed, the key it would be), or None."""
    section = _model_of(section)
    if section is None:
        return None
    parts = [key]
    while (
        isinstance(value, dict) and len(value) == 1
    ):  # `--set a.b.c=1` reaches here as a: {b: {c: 1}}
        ((inner, value),) = value.items()
        parts.append(str(inner))
    for name, field in section.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is not None and _accepts(sub, parts):
            return ".".join(parts), f"{name}.{'.'.join(parts)}"
    return None


def _describe(error: dict, cls: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        section: Any = cls
        for part in error["loc"][:-1]:
            field = section.model_fields.get(str(part)) if isinstance(section, type) else None
            section = field.annotation if field is not None else None
        known = (
            sorted(section.model_fields)
            if isinstance(section, type) and issubclass(section, BaseModel)
            else []
        )
        hint = _nested_key_hint(section, str(error["loc"][-1]), error.get("input"))
        if hint:
            typed, meant = hint
            return f"unknown config key `{'.'.join([*loc.split('.')[:-1], typed])}`; did you mean {meant}?"
        return f"unknown config key `{loc}`" + (
            f"; known keys here: {', '.join(known)}" if known else ""
        )
    if not loc:  # a check across keys (a model validator): its message names them
        return str(error["msg"]).removeprefix("Value error, ")
    return f"config key `{loc}`: {error['msg']}"


def build_config(cls: type[C], data: dict) -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError("; ".join(_describe(err, cls) for err in e.errors())) from None


def load_config(
    cls: type[C], path: str | None = None, overrides: Iterable[str] = (), **explicit: Any
) -> C:
    """Defaults from `cls`, then the YAML file, then `--set` overrides, then explicit CLI flags (not None)."""
    data = read_yaml(path) if path else {}
    data = merge_dicts(data, parse_overrides(overrides))
    for dotted, value in explicit.items():
        if value is not None:
            _set_nested(data, dotted.replace("__", "."), value)
    return build_config(cls, data)


def redact(value: Any) -> Any:
    """A copy of a config dump with secret-bearing keys replaced, safe for logs and summaries."""
    if isinstance(value, dict):
        return {
            k: ("<redacted>" if k in SECRET_KEYS and v else redact(v)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def config_hash(config: BaseModel) -> str:
    """A stable hash of the settings that change results (secrets excluded), for summaries and resume checks."""
    dump = redact(config.model_dump(mode="json"))
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]
