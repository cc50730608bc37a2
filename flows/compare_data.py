"""The data of each column of `imer compare`: a corpus profile or an imported dataset (one fold).

A profile column builds the corpus with `imer corpus ingest extract_* splits` in its own folder.
A dataset column imports the published features once per import settings (`imer import` with the
dataset's `import:` block from configs/<name>.yaml, sources read where params say) and splits them
once per fold (`imer splits`), so IEMOCAP's five folds share one import. Each folder is keyed by a
hash of what its data depends on (for imports also the size and mtime of the source files) and
holds `data.json` once built; a built folder is never rebuilt.
"""
from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.core.atomic import write_json
from pipeline.core.hashing import config_hash
from pipeline.core.params import DEFAULT_DATA_DIR, data_paths, load_all_params, with_data_paths

DATA_STAGES = ("corpus", "ingest", "extract_acoustic", "extract_visual", "extract_textual", "splits")
SOURCE_KEYS = ("label_path", "pickle_path")  # import settings naming files read (feature_dirs: folders)
RunImer = Callable[[tuple[str, ...], Path, bool, dict[str, str]], tuple[int, str, float]]

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass
class Column:
    """One column of the matrix: a corpus profile, or an imported dataset (and fold)."""

    label: str  # the name cells and the report use: the profile, `mosi`, `iemocap4-fold3`
    kind: str  # profile | dataset
    dotted: dict[str, Any] = field(default_factory=dict)  # params it sets on the spec's common ones
    settings: str | None = None  # dataset: its overlay (configs/<name>.yaml)


@dataclass
class ColumnData:
    """Where a built column's data lies (absolute paths) and the hash of its content's inputs."""

    key: str
    manifest: Path
    features_dir: Path
    splits_dir: Path


def dataset_columns(entries: list[dict[str, Any]], where: str) -> list[Column]:
    """compare.yaml `datasets:` entries -> columns; `folds: [..]` gives one LOSO column per fold."""
    columns = []
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise ValueError(f"{where}: each `datasets` entry needs a name (e.g. {{name: iemocap4, folds: [0, 1]}})")
        unknown = sorted(set(entry) - {"name", "settings", "set", "folds"})
        if unknown:
            raise ValueError(f"{where}: datasets entry {entry['name']!r}: unknown keys {unknown} (name, settings, set, folds)")
        name = str(entry["name"])
        settings = str(entry.get("settings") or f"configs/{name}.yaml")
        dotted = dict(entry.get("set") or {})
        folds = entry.get("folds")
        if folds is None:
            columns.append(Column(name, "dataset", dotted, settings))
        for fold in folds or []:
            columns.append(Column(f"{name}-fold{int(fold)}", "dataset",
                                  {**dotted, "splits.strategy": "loso", "splits.fold": int(fold)}, settings))
    return columns


def set_dotted(params: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `params` with `a.b.c: value` entries applied (missing levels created)."""
    out = copy.deepcopy(params)
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def column_params(base: dict[str, Any], common: dict[str, Any], column: Column) -> dict[str, Any]:
    """The column's params: base + common; a profile's corpus, or a dataset's import and splits blocks."""
    params = set_dotted(base, common)
    if column.kind == "profile":
        return set_dotted(params, {"corpus.profile": column.label, "data.dir": DEFAULT_DATA_DIR, **column.dotted})
    path = Path(column.settings or "")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: settings of dataset column {column.label} not found "
                                f"(a params overlay with an `import:` block, see configs/)")
    overlay = load_all_params(path)
    for section in ("import", "splits"):  # its other blocks (runs/ outputs) serve the direct path only
        params[section] = {**params.get(section, {}), **(overlay.get(section) or {})}
    return set_dotted(params, column.dotted)


def data_key(params: dict[str, Any]) -> str:
    """Hash of what a profile's data depends on (workers change no byte, so they are left out)."""
    data = params.get("data") or {}
    sections = {s: {k: v for k, v in with_data_paths(s, params.get(s, {}), data).items() if k != "workers"}
                for s in DATA_STAGES}
    return config_hash(sections)


def prepare(column: Column, params: dict[str, Any], out_dir: Path, prefect: bool, env: dict[str, str],
            run_imer: RunImer) -> ColumnData:
    """Build (once) the column's data under out_dir/data/; where it lies."""
    if column.kind == "profile":
        key = data_key(params)
        folder = _build(out_dir / "data" / f"{column.label}-{key[:12]}", params, DATA_STAGES, key, column.label,
                        prefect, env, run_imer)
        paths = {k: folder / v for k, v in data_paths(params.get("data") or {}).items()}
        return ColumnData(key, paths["manifest"], paths["features_dir"], paths["splits_dir"])
    imported = _import_params(params)
    import_key = config_hash({"import": imported["import"], "sources": source_fingerprint(imported["import"])})
    name = Path(column.settings or column.label).stem
    source = _build(out_dir / "data" / f"{name}-import-{import_key[:12]}", imported, ("import",), import_key,
                    name, prefect, env, run_imer)
    split = set_dotted(params, {"data.dir": str(source), "splits.out_dir": "splits"})
    key = config_hash({"import": import_key, "splits": with_data_paths("splits", split["splits"], split["data"])})
    folder = _build(out_dir / "data" / f"{column.label}-{key[:12]}", split, ("splits",), key, column.label,
                    prefect, env, run_imer)
    return ColumnData(key, source / "manifest.parquet", source / "features", folder / "splits")


def _import_params(params: dict[str, Any]) -> dict[str, Any]:
    """The import's params: sources absolute (the stage runs in its own folder), outputs inside it."""
    section = dict(params.get("import") or {})
    for key in SOURCE_KEYS:
        if section.get(key):
            section[key] = str(Path(section[key]).resolve())
    section["feature_dirs"] = {m: str(Path(p).resolve()) for m, p in (section.get("feature_dirs") or {}).items()}
    section.update(manifest_out="manifest.parquet", features_dir="features")
    return {**params, "import": section}


def source_fingerprint(section: dict[str, Any]) -> list[list[Any]]:
    """(path, files, bytes, newest mtime) of each source the import reads: a replaced file changes it."""
    out = []
    if section.get("format") == "gcnet":
        paths = [section.get("label_path"), *(section.get("feature_dirs") or {}).values()]
    else:
        paths = [section.get("pickle_path")]
    for path in filter(None, paths):
        path = Path(path)
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
        stats = [p.stat() for p in files]
        out.append([str(path), len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)])
    return out


def _build(folder: Path, params: dict[str, Any], stages: tuple[str, ...], key: str, label: str, prefect: bool,
           env: dict[str, str], run_imer: RunImer) -> Path:
    """Run `imer <stages>` in `folder` unless its data.json says it is built; one builder per folder."""
    with _locks_guard:
        lock = _locks.setdefault(str(folder), threading.Lock())
    with lock:  # fold columns share one import folder
        if (folder / "data.json").exists():
            return folder.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        rc, tail, seconds = run_imer(stages, folder, prefect, env)
        if rc != 0:
            raise RuntimeError(f"imer compare: data of {label} ({' '.join(stages)}) failed (exit {rc}); "
                               f"see {folder / 'log.txt'}:{os.linesep}{tail[-1500:]}")
        write_json(folder / "data.json", {"column": label, "stages": list(stages), "key": key, "seconds": round(seconds, 1)})
        return folder.resolve()
