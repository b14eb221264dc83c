"""Config files: YAML in, dotted ``section.key=value`` overrides, YAML out.

Unknown keys suggest the nearest known one; type errors name the key and the value.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from byol.config.sections import AUTO, SECTIONS, Augment, Auto, Config, ConfigError, is_auto
from byol.files import atomic_write_text
from byol.presets import AUGMENT_ABLATIONS, AUGMENT_SETS, METHOD_PRESETS


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the field's annotated type; ConfigError on mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        if value is None and type(None) in args:
            return None
        if Auto in args and is_auto(value):  # `auto`: chosen when the run starts (byol.auto)
            return AUTO
        (inner,) = [a for a in args if a is not type(None) and a is not Auto]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config: {key} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        return _to_float(value, key)
    if tp is str:
        # YAML reads `name: 2024` as an int; a string field takes any scalar as its text
        if isinstance(value, (list, tuple, dict)) or value is None:
            raise ConfigError(f"config: {key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this module, not user's


def _to_float(value: Any, key: str) -> float:
    """A finite float. Accepts "1e-6" strings: YAML 1.1 reads exponents without a dot as text."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config: {key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"config: {key} must be a finite number, got {value!r}")
    return float(value)


def _build_section(name: str, raw: dict) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in hints:
            full = [f"{name}.{f}" for f in fields]
            raise ConfigError(f"config: unknown key '{name}.{key}'{_suggest(f'{name}.{key}', full)}")
    return cls(**{k: _coerce(v, hints[k], f"{name}.{k}") for k, v in raw.items()})


def config_from_dict(raw: dict) -> Config:
    """Nested dict (as in YAML) -> validated Config. Missing keys take their defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"config: unknown section '{name}'{_suggest(str(name), list(SECTIONS))}")
        if body is None:
            body = {}
        if name == "method" and isinstance(body, str):  # "method: moco" is method.name=moco
            body = {"name": body}
        if not isinstance(body, dict):
            raise ConfigError(f"config: section '{name}' must be a mapping, got {body!r}")
        sections[name] = dict(body)
    aug = sections.setdefault("augment", {})
    preset = aug.get("preset", Augment.preset)
    if preset not in AUGMENT_SETS:
        raise ConfigError(f"config: augment.preset must be one of {', '.join(AUGMENT_SETS)}, got {preset!r}")
    ablation = aug.get("ablation", Augment.ablation)
    if ablation not in AUGMENT_ABLATIONS:
        raise ConfigError(f"config: augment.ablation must be one of {', '.join(AUGMENT_ABLATIONS)}, "
                          f"got {ablation!r}")
    sections["augment"] = {**AUGMENT_SETS[preset], **aug, **AUGMENT_ABLATIONS[ablation]}
    name = sections.get("method", {}).get("name", "byol")
    if name not in METHOD_PRESETS:
        raise ConfigError(f"config: method.name must be one of {', '.join(METHOD_PRESETS)}, got {name!r}")
    for section, values in METHOD_PRESETS[name].items():  # the preset fills what is not set
        sections[section] = {**values, **sections.get(section, {})}
    return Config(**{name: _build_section(name, body) for name, body in sections.items()})


# Short forms of a key: ``method=simclr`` (the preset) is ``method.name=simclr``.
SHORTHANDS = {"method": "method.name"}


def parse_override(item: str) -> tuple[str, str]:
    """``"section.key=value"`` -> ``("section.key", "value")``: the key as written (stripped,
    a shorthand kept), the value's text unparsed. ConfigError unless it has that shape."""
    key, sep, text = item.partition("=")
    key = key.strip()
    parts = SHORTHANDS.get(key, key).split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"config: override {item!r} must look like section.key=value")
    return key, text


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Many overrides -> {key: value text}; a key given twice keeps its last value."""
    return dict(parse_override(item) for item in items)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict, in order."""
    out = {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in raw.items()}
    if isinstance(out.get("method"), str):
        out["method"] = {"name": out["method"]}
    for item in overrides:
        key, text = parse_override(item)
        name, field = SHORTHANDS.get(key, key).split(".")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        section = out.setdefault(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"config: section '{name}' must be a mapping")
        section[field] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a config file; ConfigError (one line) when missing or not valid YAML."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config: {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path} is not a text (YAML) file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config: {path}{where}: invalid YAML") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must be a mapping of sections (data:, optim:, ...), "
                          f"got a {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + overrides -> Config."""
    raw = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides or []))


def config_to_dict(cfg: Config) -> dict:
    """Config -> plain nested dict (tuples as lists), suitable for YAML and JSON."""

    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in SECTIONS}


# Keys added after runs were written, with the value that reproduces what those runs did: a
# config saved without them resumes and evaluates as it trained.
ADDED_KEYS: dict[tuple[str, str], Any] = {("augment", "semantics"): "torchvision"}


def saved_run_config(raw: dict) -> dict:
    """A config dict a run saved (config.yaml or a checkpoint), with every key of ``ADDED_KEYS``
    it lacks set to the behaviour it was trained with."""
    raw = {**raw}
    for (section, key), value in ADDED_KEYS.items():
        part = dict(raw.get(section) or {})
        part.setdefault(key, value)
        raw[section] = part
    return raw


def leading_comments(path: str | Path) -> list[str]:
    """The ``# `` lines at the top of a YAML file (those ``save_config`` wrote), without the ``# ``."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for line in lines:
        if not line.startswith("#"):
            break
        out.append(line[2:] if line.startswith("# ") else line[1:])
    return out


def save_config(cfg: Config, path: str | Path, comments: list[str] = ()) -> None:
    """Write ``cfg`` as YAML, atomically: a kill or a full disk never leaves a run's config.yaml
    empty (a resume reads it). ``comments``: lines written first, each after a ``# ``."""
    head = "".join(f"# {line}\n" for line in comments)
    atomic_write_text(path, head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def replace(cfg: Config, **sections: dict) -> Config:
    """Copy of ``cfg`` with some fields changed: ``replace(cfg, optim={"epochs": 2})``."""
    raw = config_to_dict(cfg)
    for name, changes in sections.items():
        raw[name].update(changes)
    return config_from_dict(raw)
