"""`imer compare`: the statistics against hand-computed cases, the report from real cell files,
and (slow) a tiny matrix end to end: every cell reported, nothing recomputed, failures kept."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.core.modalities import COMBINATIONS
from pipeline.tracking.compare_report import summarise, write_compare_report
from pipeline.tracking.compare_stats import mean_std, paired_bootstrap, paired_permutation, rank


def test_mean_std_by_hand() -> None:
    got = mean_std([0.5, 0.7])
    assert got["mean"] == pytest.approx(0.6) and got["std"] == pytest.approx(math.sqrt(0.02)) and got["n"] == 2
    assert mean_std([0.4])["std"] == 0.0


def test_permutation_exact_by_hand() -> None:
    # d = [1, 1, 1, 0]: 8 sign patterns of the 3 non-zero pairs, |sum| = 3 in 2 of them -> p = 2/8
    res = paired_permutation(np.array([1, 1, 1, 0]), np.array([0, 0, 0, 0]))
    assert res.delta == pytest.approx(0.75) and res.p_value == pytest.approx(0.25) and res.method == "permutation-exact"
    # two seeds x two utterances, d = [1, 0, 1, 0]: patterns ++, +-, -+, -- -> |sum| 2, 0, 0, 2 -> p = 1/2
    res = paired_permutation(np.array([[1, 1], [1, 0]]), np.array([[0, 1], [0, 0]]))
    assert res.delta == pytest.approx(0.5) and res.p_value == pytest.approx(0.5) and res.n_pairs == 4
    assert paired_permutation(np.ones(5), np.ones(5)).p_value == 1.0


def test_permutation_monte_carlo_detects_a_real_difference() -> None:
    rng = np.random.default_rng(0)
    a = (rng.random((3, 200)) < 0.8).astype(float)
    b = (rng.random((3, 200)) < 0.5).astype(float)
    assert paired_permutation(a, b, n_perm=2000).p_value < 0.01
    assert paired_permutation(a, a[:, ::-1], n_perm=2000).p_value > 0.05  # same distribution


def test_bootstrap_by_hand() -> None:
    # one seed, d = [1, 0]: a replicate's mean is 0, .5 or 1 with probabilities 1/4, 1/2, 1/4
    res = paired_bootstrap(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]), n_boot=8000, seed=1)
    assert res.delta == pytest.approx(0.5)
    assert res.p_value == pytest.approx(0.5, abs=0.04)  # 2 * P(rep <= 0) = 2 * 1/4
    assert res.ci_low == 0.0 and res.ci_high == 1.0
    same = paired_bootstrap(np.ones((2, 3)), np.ones((2, 3)))
    assert same.delta == 0 and same.p_value == 1.0
    sure = paired_bootstrap(np.ones((2, 3)), np.zeros((2, 3)))
    assert sure.ci_low == sure.ci_high == 1.0 and sure.p_value == 0.0
    with pytest.raises(ValueError, match="equal shapes"):
        paired_bootstrap(np.ones((2, 3)), np.ones((3, 2)))


def test_rank_puts_failed_last() -> None:
    assert rank({"a": 0.5, "b": float("nan"), "c": 0.7}) == ["c", "a", "b"]


def _fake_cell(folder: Path, row: str, seed: int, accuracy: float, rng: np.random.Generator) -> dict:
    """A finished cell's real output files (as train + evaluate write them), with chosen accuracy."""
    (folder / "reports" / "plots").mkdir(parents=True)
    (folder / "models").mkdir()
    ids = [f"u{i:03d}" for i in range(40)]
    target = rng.integers(0, 4, len(ids))
    rows, fixed = [], {}
    for combo in (*COMBINATIONS, "natural"):
        right = rng.random(len(ids)) < accuracy
        pred = np.where(right, target, (target + 1) % 4)
        rows += [{"utterance_id": u, "combination": combo, "target": int(t), "prediction": int(p)}
                 for u, t, p in zip(ids, target, pred)]
        fixed[combo] = {"wa": float(right.mean()), "ua": 0.0, "wf1": 0.0, "n": len(ids)}
    natural = fixed.pop("natural")
    fixed["mean"] = {"wa": float(np.mean([fixed[c]["wa"] for c in COMBINATIONS]))}
    metrics = {"test": {"fixed": fixed, "natural": natural, "random": {"0.5": {"wa": accuracy}}}}
    (folder / "reports" / "metrics.json").write_text(json.dumps(metrics))
    (folder / "models" / "train_summary.json").write_text(json.dumps({"parameter_counts": {"main": {"trainable": 123}}}))
    with (folder / "reports" / "plots" / "test_predictions.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"cell": f"balanced/{row}/seed{seed}", "row": row, "seed": seed, "profile": "balanced", "key": row + str(seed),
            "folder": str(folder), "status": "ok", "seconds": 10.0, "computed": True}


def test_report_from_cell_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    records = [_fake_cell(tmp_path / f"{row}{s}", row, s, acc, rng)
               for row, acc in (("plain", 0.4), ("strong", 0.9)) for s in (1, 2)]
    records.append({"cell": "balanced/broken/seed1", "row": "broken", "seed": 1, "profile": "balanced",
                    "folder": str(tmp_path / "x"), "status": "failed", "exit_code": 1, "seconds": 1.0,
                    "computed": True, "log_tail": "imer train: error: unknown train.method 'nope'\n"})
    summary = summarise(records, ["plain"], n_boot=300)
    prof = summary["profiles"]["balanced"]
    assert prof["rows"]["strong"]["scores"]["atv"]["n"] == 2 and prof["rows"]["broken"]["scores"] == {}
    assert prof["ranking"]["atv"][:2] == ["strong", "plain"] and prof["ranking"]["atv"][-1] == "broken"
    test = prof["paired"]["plain"]["strong"]["mean"]
    assert test["delta"] > 0.3 and test["p_bootstrap"] < 0.01 and test["p_permutation"] < 0.01
    assert test["n_pairs"] == 2 * 40
    assert [f["cell"] for f in summary["failed"]] == ["balanced/broken/seed1"]
    paths = write_compare_report(records, ["plain"], tmp_path / "reports", {}, {"wall_s": 1}, n_boot=300)
    md = Path(paths["md"]).read_text()
    assert "strong" in md and "failed cells" in md and "unknown train.method" in md
    assert "data:image/png;base64," in Path(paths["html"]).read_text()
    assert json.loads(Path(paths["json"]).read_text())["profiles"]["balanced"]["rows"]["plain"]["trainable_params"] == 123


TINY = {  # dotted params of every cell: a tiny corpus and a few epochs
    "corpus.utterances": 48, "corpus.sessions": 4, "corpus.speakers_per_session": 1, "corpus.max_duration_s": 2.0,
    "corpus.breakage_share": 0.0, "corpus.workers": 1, "extract_acoustic.workers": 1, "extract_visual.workers": 1,
    "train.max_epochs": 2, "train.patience": 2, "train.stage1_epochs": 1,
}


@pytest.mark.slow
def test_tiny_matrix_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.compare import main

    spec = {"out_dir": str(tmp_path / "runs"), "report_dir": str(tmp_path / "reports"), "jobs": 2, "prefect": False,
            "profiles": ["balanced"], "seeds": [1, 2], "baselines": ["plain"], "set": TINY,
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "cmp"},
            "rows": [{"name": "plain", "set": {"train.variant": "plain"}}, {"name": "mculora", "set": {}},
                     {"name": "broken", "set": {"train.method": "no_such_method"}}]}
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(spec))
    argv = ["--spec", str(tmp_path / "compare.yaml"), "--params", str(Path("params.yaml").resolve())]
    assert main(argv) == 1  # the broken row fails; the others finish
    report = json.loads((tmp_path / "reports" / "compare.json").read_text())
    cells = {c["cell"]: c for c in report["cells"]}
    assert len(cells) == 6 and sum(c["status"] == "ok" for c in cells.values()) == 4
    assert {f["cell"] for f in report["failed"]} == {"balanced/broken/seed1", "balanced/broken/seed2"}
    rows = report["profiles"]["balanced"]["rows"]
    assert rows["plain"]["scores"]["atv"]["n"] == 2 and rows["mculora"]["scores"]["mean"]["n"] == 2
    assert "p_bootstrap" in report["profiles"]["balanced"]["paired"]["plain"]["mculora"]["atv"]
    md = (tmp_path / "reports" / "compare.md").read_text()
    assert "mculora" in md and "balanced/broken/seed1" in md
    assert (tmp_path / "reports" / "compare.html").stat().st_size > 1000

    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec["mlflow"]["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("cmp").experiment_id])
    parents = [r for r in runs if r.data.tags.get("imer.kind") == "compare"]
    assert len(parents) == 1 and sum(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in runs) == 6

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "cells").glob("*/cell.json")}
    assert main(argv) == 1  # second invocation: finished cells are not recomputed, failed ones retried
    again = {c["cell"]: c for c in json.loads((tmp_path / "reports" / "compare.json").read_text())["cells"]}
    assert [c for c, r in again.items() if r["computed"]] == ["balanced/broken/seed1", "balanced/broken/seed2"]
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "cells").glob("*/cell.json")}


def test_a_profile_whose_data_fails_is_reported_not_fatal(tmp_path: Path) -> None:
    """An unknown corpus profile fails in `imer corpus`: its cells are failed records, the report lists them."""
    from flows.compare import Spec, run_matrix

    spec = Spec(rows={"plain": {"train.variant": "plain"}}, seeds=[1, 2], profiles=["exotic"],
                out_dir=str(tmp_path / "runs"), prefect=False)
    records = run_matrix(spec, [str(Path("params.yaml").resolve())])
    assert [r["cell"] for r in records] == ["exotic/plain/seed1", "exotic/plain/seed2"]
    assert all(r["status"] == "failed" and "corpus.profile" in r["log_tail"] for r in records)
    assert not (tmp_path / "runs" / "cells").exists()
    paths = write_compare_report(records, [], tmp_path / "reports")
    assert "exotic/plain/seed2" in Path(paths["md"]).read_text()
