"""Read one stage's section of params: each stage sees only its own keys.

Several params files may be given (`imer train --params params.yaml --params
configs/mosi-mmsa.yaml`): later files override earlier ones key by key, so a
dataset overlay changes only what differs from the defaults.
"""
from __future__ import annotations

from pathlib import Path
from dataclasses import fields, is_dataclass
from typing import Any, Mapping, Sequence

import yaml

from pipeline.core.hashing import config_hash  # noqa: F401  (re-exported: params and their hash)

DEFAULT_PARAMS = Path("params.yaml")
ParamsPaths = str | Path | Sequence[str | Path]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge `override` into a copy of `base`; nested dicts merge, everything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_all_params(paths: ParamsPaths = DEFAULT_PARAMS) -> dict[str, Any]:
    """All sections of the given params files, merged in order."""
    # A comma-separated string is a list too: it survives Prefect flow parameters typed `str`.
    files = str(paths).split(",") if isinstance(paths, (str, Path)) else list(paths)
    merged: dict[str, Any] = {}
    for path in map(Path, files):
        if not path.exists():
            raise FileNotFoundError(f"{path}: params file not found (run from the project root)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: params file must hold a mapping of sections")
        merged = deep_merge(merged, data)
    return merged


def load_params(section: str, path: ParamsPaths = DEFAULT_PARAMS) -> dict[str, Any]:
    """Return `section` of the (merged) params, failing with the file names if it is absent."""
    data = load_all_params(path)
    if section not in data:
        raise KeyError(f"{path}: no section '{section}'")
    return data[section]


def build_config(cls: type, values: dict[str, Any], where: str) -> Any:
    """A typed stage config `cls` (a dataclass owning its defaults) from a params section.

    Unknown keys raise with their dotted name; nested dataclass fields build from nested mappings.
    """
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"params {where}: unknown keys {', '.join(where + '.' + k for k in unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        if is_dataclass(default) and isinstance(value, Mapping):
            kwargs[name] = build_config(type(default), dict(value), f"{where}.{name}")
        elif isinstance(default, dict):
            kwargs[name] = dict(value or {})
        else:
            kwargs[name] = value
    return cls(**kwargs)
