"""Stage `ingest`: turn a user's corpus listing (CSV or Parquet) into a validated manifest.

The listing is how users bring their own raw dataset (RAVDESS-like, MELD-like). A
structurally bad row (a ragged CSV line included) is a user error and is reported
with its file line, its data row and its column: "line 7, data row 6" (line 1 is the
header; a Parquet listing has data rows only). A referenced media file that cannot be
used is *real missingness* and only marks that modality missing for that utterance,
with a named reason (`file_absent`, `not_a_file`, `symlink_loop`, `permission_denied`,
`unreadable_file`; see `pipeline.core.media_paths`). The manifest keeps the path as
listed (made absolute or project-relative), never the target of a symlink.
Optional `dialogue` / `turn` columns (conversation structure) become first-class
manifest columns; a turn must be a whole number >= 0 on a row that names its dialogue.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.core.atomic import write_json
from pipeline.core.media_paths import listed_path, probe_file
from pipeline.formats.manifest import (DIALOGUE_COLUMNS, parse_turn, DIALOGUE_TYPES, MANIFEST_SCHEMA, MODALITIES, PATH_COLUMNS,
                                     manifest_meta, write_manifest)
from pipeline.core.params import load_params

SECTION = "ingest"
REQUIRED = ("utterance_id", "session", "speaker")
MAX_LISTED_ERRORS = 20


@dataclass
class RowProblem:
    """One validation problem, located by 1-based data row (and file line for CSV) and column name."""

    row: int
    column: str
    problem: str
    line: int | None = None  # 1-based line in the listing file (header = line 1); None for Parquet

    def __str__(self) -> str:
        where = f"line {self.line}, data row {self.row}" if self.line is not None else f"data row {self.row}"
        return f"{where}, column '{self.column}': {self.problem}"


@dataclass
class Listing:
    """A parsed listing: rows as dicts, each row's file line (CSV), and rows the parser rejected."""

    rows: list[dict[str, Any]]
    lines: list[int | None]
    ragged: list[RowProblem] = field(default_factory=list)


@dataclass
class IngestReport:
    utterances: int
    rejected: list[RowProblem] = field(default_factory=list)
    missing: dict[str, int] = field(default_factory=dict)
    missing_reasons: dict[str, dict[str, int]] = field(default_factory=dict)  # modality -> reason -> rows
    classes: list[str] = field(default_factory=list)


def read_listing(path: Path) -> Listing:
    """Read a CSV or Parquet listing; every column as given (CSV as strings).

    A CSV row with the wrong number of fields does not stop the read: it comes back as
    a `RowProblem` naming its line, so it is reported (or skipped) like any bad row.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: listing not found")
    if not path.is_file():
        raise ValueError(f"{path}: listing is not a regular file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
            return Listing(rows, [None] * len(rows))
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: cannot parse listing ({exc})") from exc
    raise ValueError(f"{path}: listing must be .csv, .tsv or .parquet, got '{suffix}'")


def _read_csv(path: Path, delimiter: str) -> Listing:
    bad: list[pacsv.InvalidRow] = []

    def keep_bad(row: pacsv.InvalidRow) -> str:
        bad.append(row)
        return "skip"

    opts = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=keep_bad)
    # Strings everywhere: ids like "007" must not become integers. One thread keeps bad rows in file order.
    table = pacsv.read_csv(
        path, parse_options=opts, read_options=pacsv.ReadOptions(use_threads=False),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True, column_types=_all_strings(path, opts)),
    )
    # Without quoted newlines (the parser's default) a record is one non-empty line after the header.
    text_lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    numbered = [(i, ln.rstrip("\r")) for i, ln in enumerate(text_lines, start=1) if ln.rstrip("\r")][1:]
    lines: list[int | None] = []
    ragged: list[RowProblem] = []
    pending = list(bad)
    for data_row, (line, content) in enumerate(numbered, start=1):
        if pending and content == pending[0].text:
            row = pending.pop(0)
            ragged.append(RowProblem(data_row, "(whole row)", f"expected {row.expected_columns} fields, got {row.actual_columns}", line))
        else:
            lines.append(line)
    rows = table.to_pylist()
    if len(lines) != len(rows):  # quoted newlines or the like: keep data rows, drop the line numbers
        lines = [None] * len(rows)
    for row in pending:  # not located: still reported, without a line
        ragged.append(RowProblem(0, "(whole row)", f"expected {row.expected_columns} fields, got {row.actual_columns}: {row.text[:80]!r}"))
    return Listing(rows, lines, ragged)


def _all_strings(path: Path, opts: pacsv.ParseOptions) -> dict[str, pa.DataType]:
    skip_all = pacsv.ParseOptions(delimiter=opts.delimiter, invalid_row_handler=lambda _row: "skip")  # bad rows are read later
    header = pacsv.open_csv(path, parse_options=skip_all).schema.names
    return {name: pa.string() for name in header}


def ingest(listing_path: Path, out_path: Path, task: str = "classification", classes: list[str] | None = None, on_bad_row: str = "error", project_root: Path | None = None) -> IngestReport:
    """Validate the listing and write the manifest. Pure apart from reading files it names."""
    if task not in ("classification", "regression"):
        raise ValueError(f"ingest.task must be classification or regression, got {task!r}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"ingest.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    listing_path = Path(listing_path)
    root = (project_root or Path.cwd()).resolve()
    listing = read_listing(listing_path)
    rows = listing.rows
    target_col = "label" if task == "classification" else "score"
    header = set(rows[0]) if rows else set()
    absent = [c for c in (*REQUIRED, target_col) if c not in header]
    if rows and absent:
        raise ValueError(f"{listing_path}: missing required column(s) {absent}; see README 'Bring your own corpus'")
    if not rows:
        ragged = "".join(f"\n  {p}" for p in listing.ragged[:MAX_LISTED_ERRORS])
        raise ValueError(f"{listing_path}: listing has no readable rows{ragged}")

    dialogue_cols = [c for c in DIALOGUE_COLUMNS if c in header or (c == "dialogue" and "turn" in header)]
    problems: list[RowProblem] = list(listing.ragged)
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, (row, line) in enumerate(zip(rows, listing.lines), start=1):
        row_problems = _validate_row(row, _data_row(number, line, listing), task, classes, seen, line)
        seen.add(str(row.get("utterance_id") or "").strip())
        if row_problems:
            problems.extend(row_problems)
            continue
        kept.append(_manifest_row(row, listing_path.parent.resolve(), root, task, dialogue_cols))

    problems.sort(key=lambda p: (p.line or 0, p.row))
    if problems and on_bad_row == "error":
        listed = "\n  ".join(str(p) for p in problems[:MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_ERRORS} more" if len(problems) > MAX_LISTED_ERRORS else ""
        raise ValueError(f"{listing_path}: {len(problems)} invalid value(s):\n  {listed}{more}")
    if not kept:
        raise ValueError(f"{listing_path}: no valid rows left")

    found_classes = classes or (sorted({r["label"] for r in kept}) if task == "classification" else [])
    columns = {name: pa.array([r.get(name) for r in kept], MANIFEST_SCHEMA.field(name).type) for name in MANIFEST_SCHEMA.names}
    columns.update({name: pa.array([r[name] for r in kept], DIALOGUE_TYPES[name]) for name in dialogue_cols})
    # Pass-through columns (ground truth `gt_*`, a published `split`) keep their listing types.
    columns.update({name: pa.array([r.get(name) for r in kept]) for name in kept[0] if name not in columns})
    table = pa.table(columns)
    meta = manifest_meta(task, found_classes, source=str(listing_path))
    write_manifest(table, out_path, meta)
    missing = {m: sum(1 for r in kept if r[f"{m}_missing"]) for m in MODALITIES}
    reasons = {m: dict(sorted(Counter(r[f"{m}_missing"] for r in kept if r[f"{m}_missing"]).items())) for m in MODALITIES}
    return IngestReport(utterances=len(kept), rejected=problems, missing=missing, missing_reasons=reasons, classes=found_classes)


def _data_row(index: int, line: int | None, listing: Listing) -> int:
    """The 1-based data row of the `index`-th parsed row (ragged rows count: they are data rows too)."""
    if line is None:
        return index
    return index + sum(1 for p in listing.ragged if p.line is not None and p.line < line)


def _validate_row(row: dict[str, Any], number: int, task: str, classes: list[str] | None, seen: set[str], line: int | None = None) -> list[RowProblem]:
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
    problems.extend(_dialogue_problems(row, number))
    for problem in problems:
        problem.line = line
    return problems


def _dialogue_problems(row: dict[str, Any], number: int) -> list[RowProblem]:
    """`turn` must be a whole number >= 0 and needs a `dialogue` on the same row."""
    raw = row.get("turn")
    if _blank(raw):
        return []
    problems = []
    if parse_turn(raw) is None:
        problems.append(RowProblem(number, "turn", f"'{raw}' is not a non-negative integer"))
    if _blank(row.get("dialogue")):
        problems.append(RowProblem(number, "turn", "given without a dialogue (a turn is a position inside a dialogue)"))
    return problems


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def _manifest_row(row: dict[str, Any], listing_dir: Path, root: Path, task: str, dialogue_cols: list[str]) -> dict[str, Any]:
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
        path = listed_path(str(raw).strip(), listing_dir)  # symlinks kept as listed
        out[column] = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        problem = probe_file(path)
        out[f"{modality}_missing"] = problem[0] if problem else None
    for key, value in row.items():
        if key.startswith("gt_") or key == "split":
            out[key] = value
    if "dialogue" in dialogue_cols:  # listing columns `dialogue` / `turn`: first-class manifest columns
        out["dialogue"] = None if _blank(row.get("dialogue")) else str(row["dialogue"]).strip()
    if "turn" in dialogue_cols:
        out["turn"] = None if _blank(row.get("turn")) else parse_turn(row["turn"])
    return out


def run_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Resolve params, ingest, and record rejected rows beside the manifest."""
    out = Path(params.get("out", "data/manifest.parquet"))
    report = ingest(Path(params["listing"]), out, task=params.get("task", "classification"), classes=params.get("classes"), on_bad_row=params.get("on_bad_row", "error"))
    write_json(out.with_suffix(".report.json"), {
        "utterances": report.utterances, "missing_before_extraction": report.missing, "missing_reasons": report.missing_reasons,
        "classes": report.classes, "rejected_rows": [str(p) for p in report.rejected],
    })
    return {"utterances": report.utterances, "missing": report.missing, "rejected": len(report.rejected)}


def main() -> None:
    print(run_stage(load_params(SECTION)))


if __name__ == "__main__":
    main()
