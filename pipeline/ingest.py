"""Stage `ingest`: turn a user's corpus listing (CSV or Parquet) into a validated manifest.

The listing is how users bring their own raw dataset (RAVDESS-like, MELD-like). A
structurally bad row is a user error and is reported with its row and column; a
referenced media file that does not exist is *real missingness* and only marks that
modality missing for that utterance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.atomic import write_json
from pipeline.manifest import MANIFEST_SCHEMA, MODALITIES, PATH_COLUMNS, manifest_meta, write_manifest
from pipeline.params import load_params

SECTION = "ingest"
REQUIRED = ("utterance_id", "session", "speaker")
MAX_LISTED_ERRORS = 20


@dataclass
class RowProblem:
    """One validation problem, located by 1-based data row and column name."""

    row: int
    column: str
    problem: str

    def __str__(self) -> str:
        return f"row {self.row}, column '{self.column}': {self.problem}"


@dataclass
class IngestReport:
    utterances: int
    rejected: list[RowProblem] = field(default_factory=list)
    missing: dict[str, int] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)


def read_listing(path: Path) -> pa.Table:
    """Read a CSV or Parquet listing; every column as given (CSV as strings)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: listing not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            # Strings everywhere: ids like "007" must not become integers.
            return pacsv.read_csv(path, parse_options=opts, convert_options=pacsv.ConvertOptions(strings_can_be_null=True, column_types=_all_strings(path, opts)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: cannot parse listing ({exc})") from exc
    raise ValueError(f"{path}: listing must be .csv, .tsv or .parquet, got '{suffix}'")


def _all_strings(path: Path, opts: pacsv.ParseOptions) -> dict[str, pa.DataType]:
    header = pacsv.open_csv(path, parse_options=opts).schema.names
    return {name: pa.string() for name in header}


def ingest(listing_path: Path, out_path: Path, task: str = "classification", classes: list[str] | None = None, on_bad_row: str = "error", project_root: Path | None = None) -> IngestReport:
    """Validate the listing and write the manifest. Pure apart from reading files it names."""
    if task not in ("classification", "regression"):
        raise ValueError(f"ingest.task must be classification or regression, got {task!r}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"ingest.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    listing_path = Path(listing_path)
    root = (project_root or Path.cwd()).resolve()
    rows = read_listing(listing_path).to_pylist()
    target_col = "label" if task == "classification" else "score"
    header = set(rows[0]) if rows else set()
    absent = [c for c in (*REQUIRED, target_col) if c not in header]
    if rows and absent:
        raise ValueError(f"{listing_path}: missing required column(s) {absent}; see README 'Bring your own corpus'")
    if not rows:
        raise ValueError(f"{listing_path}: listing has no rows")

    problems: list[RowProblem] = []
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, row in enumerate(rows, start=1):
        row_problems = _validate_row(row, number, task, classes, seen)
        seen.add(str(row.get("utterance_id") or "").strip())
        if row_problems:
            problems.extend(row_problems)
            continue
        kept.append(_manifest_row(row, listing_path.parent.resolve(), root, task))

    if problems and on_bad_row == "error":
        listed = "\n  ".join(str(p) for p in problems[:MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_ERRORS} more" if len(problems) > MAX_LISTED_ERRORS else ""
        raise ValueError(f"{listing_path}: {len(problems)} invalid value(s):\n  {listed}{more}")
    if not kept:
        raise ValueError(f"{listing_path}: no valid rows left")

    found_classes = classes or (sorted({r["label"] for r in kept}) if task == "classification" else [])
    columns = {name: pa.array([r.get(name) for r in kept], MANIFEST_SCHEMA.field(name).type) for name in MANIFEST_SCHEMA.names}
    # Pass-through columns (ground truth `gt_*`, a published `split`) keep their listing types.
    columns.update({name: pa.array([r.get(name) for r in kept]) for name in kept[0] if name not in columns})
    table = pa.table(columns)
    meta = manifest_meta(task, found_classes, source=str(listing_path))
    write_manifest(table, out_path, meta)
    missing = {m: sum(1 for r in kept if r[f"{m}_missing"]) for m in MODALITIES}
    return IngestReport(utterances=len(kept), rejected=problems, missing=missing, classes=found_classes)


def _validate_row(row: dict[str, Any], number: int, task: str, classes: list[str] | None, seen: set[str]) -> list[RowProblem]:
    problems = []
    for column in REQUIRED:
        if row.get(column) is None or str(row[column]).strip() == "":
            problems.append(RowProblem(number, column, "empty"))
    uid = str(row.get("utterance_id") or "").strip()
    if uid and uid in seen:
        problems.append(RowProblem(number, "utterance_id", f"duplicate id '{uid}'"))
    if uid and any(ch in uid for ch in "/\\"):
        problems.append(RowProblem(number, "utterance_id", f"'{uid}' contains a path separator"))
    if task == "classification":
        label = row.get("label")
        if label is None or str(label).strip() == "":
            problems.append(RowProblem(number, "label", "empty"))
        elif classes and str(label).strip() not in classes:
            problems.append(RowProblem(number, "label", f"'{label}' is not one of {classes}"))
    else:
        try:
            score = float(row.get("score"))  # type: ignore[arg-type]
            if math.isnan(score):
                raise ValueError
        except (TypeError, ValueError):
            problems.append(RowProblem(number, "score", f"'{row.get('score')}' is not a number"))
    if all(not row.get(col) for col in PATH_COLUMNS.values()):
        problems.append(RowProblem(number, "audio_path/text_path/video_path", "no media path at all"))
    return problems


def _manifest_row(row: dict[str, Any], listing_dir: Path, root: Path, task: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "utterance_id": str(row["utterance_id"]).strip(),
        "session": str(row["session"]).strip(),
        "speaker": str(row["speaker"]).strip(),
        "label": str(row["label"]).strip() if task == "classification" else None,
        "score": float(row["score"]) if task == "regression" else None,
        "domain": str(row.get("domain") or "source"),
    }
    for modality, column in PATH_COLUMNS.items():
        raw = row.get(column)
        if raw is None or str(raw).strip() == "":
            out[column], out[f"{modality}_missing"] = None, "no_path"
            continue
        resolved = Path(str(raw).strip())
        resolved = resolved if resolved.is_absolute() else (listing_dir / resolved)
        resolved = resolved.resolve()
        out[column] = str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)
        out[f"{modality}_missing"] = None if resolved.is_file() else "file_absent"
    for key, value in row.items():
        if key.startswith("gt_") or key == "split":
            out[key] = value
    return out


def run_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Resolve params, ingest, and record rejected rows beside the manifest."""
    out = Path(params.get("out", "data/manifest.parquet"))
    report = ingest(Path(params["listing"]), out, task=params.get("task", "classification"), classes=params.get("classes"), on_bad_row=params.get("on_bad_row", "error"))
    write_json(out.with_suffix(".report.json"), {"utterances": report.utterances, "missing_before_extraction": report.missing, "classes": report.classes, "rejected_rows": [str(p) for p in report.rejected]})
    return {"utterances": report.utterances, "missing": report.missing, "rejected": len(report.rejected)}


def main() -> None:
    print(run_stage(load_params(SECTION)))


if __name__ == "__main__":
    main()
