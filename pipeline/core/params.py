"""Read one stage's section of params: each stage sees only its own keys.

Several params files may be given (`imer train --params params.yaml --params
configs/mosi.yaml`): later files override earlier ones key by key, so a
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
    """Return `section` of the (merged) params, failing with the file names if it is absent.

    Its data paths left null are filled from the `data` section (`with_data_paths`)."""
    data = load_all_params(path)
    if section not in data:
        raise KeyError(f"{path}: no section '{section}'")
    return with_data_paths(section, data[section], data.get("data") or {})


# The dataset that splits / train / evaluate / adapt read is the folder `data.dir` (params.yaml): the
# corpus pipeline writes data/ and an import data/imported/<name>/, both in this layout.
DATA_LAYOUT = {"manifest": "manifest.parquet", "features_dir": "features", "splits_dir": "splits"}
DATA_KEYS = {"splits": {"manifest": "manifest", "features_dir": "features_dir", "out_dir": "splits_dir"}}  # key -> layout entry
DEFAULT_DATA_DIR = "data"


def data_paths(data: Mapping[str, Any]) -> dict[str, str]:
    """manifest, features_dir and splits_dir inside the data section's `dir` (default data/)."""
    root = Path(str(data.get("dir") or DEFAULT_DATA_DIR))
    return {key: (root / name).as_posix() for key, name in DATA_LAYOUT.items()}


def with_data_paths(section: str, values: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a stage's section whose null data paths (manifest, features_dir, splits_dir; the
    splits stage's out_dir) point into `data.dir`; a path set in the section is kept."""
    keys = DATA_KEYS.get(section, {key: key for key in DATA_LAYOUT})
    paths = data_paths(data)
    out = dict(values)
    for key, entry in keys.items():
        if key in out and out[key] is None:
            out[key] = paths[entry]
    return out


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
