"""Stage evaluate on a tiny synthetic dataset and a tiny real network: structure, protocols, read-once, pyfunc."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.modalities import COMBINATIONS, MODALITY_ORDER, mask_to_index
from pipeline.training.data import MultimodalData
from pipeline.evaluate import evaluate_model, run_stage
from pipeline.methods import MCULoRANet, ModelConfig, load_model, save_model
from pipeline.tracking.pyfunc import frame_from_arrays, predict_frame
from pipeline.splits import build_splits
from tests.factories import make_feature_dataset


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core box: extra intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_model(data: MultimodalData, seed: int = 0) -> MCULoRANet:
    """Random weights, with non-zero B so every combination adapter changes the output (routing matters)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(input_dims=data.input_dims, seq_lens=data.seq_lens, task=data.task,
                      n_outputs=data.n_outputs, d_model=16, n_heads=2, d_fusion=16, dropout=0.0)
    model = MCULoRANet(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    return model.eval()


def _setup(root, task: str = "classification", n: int = 150):
    manifest, features = make_feature_dataset(root, n=n, missing_share=0.2, task=task, seed=3)
    splits = root / "splits"
    build_splits(manifest, features, splits, {"seed": 1})
    data = MultimodalData.load(manifest, features, splits)
    save_model(root / "model.pt", _tiny_model(data), {})
    return manifest, features, splits, data


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    manifest, features, splits, data = _setup(root)
    counter = _count_reads(data)
    result = evaluate_model(root / "model.pt", data, splits, batch_size=16)
    reads = {m: c.reads.copy() for m, c in counter.items()}  # snapshot: later tests read rows again
    return root, data, result, reads


class _CountingRows:
    """Wraps a memory-mapped (N, T, d) feature array and counts reads per table row."""

    def __init__(self, array: np.ndarray):
        self.array, self.reads = array, np.zeros(array.shape[0], dtype=np.int64)

    @property
    def shape(self):
        return self.array.shape

    def __getitem__(self, index):
        np.add.at(self.reads, np.arange(self.array.shape[0])[index], 1)
        return self.array[index]


def _count_reads(data: MultimodalData) -> dict[str, _CountingRows]:
    counters = {m: _CountingRows(data.features[m]) for m in MODALITY_ORDER}
    data.features.update(counters)
    return counters


def test_metrics_structure_and_mean_of_seven(evaluated):
    _, _, result, _ = evaluated
    metrics = result["metrics"]
    assert set(metrics) == {"val", "test", "combinations"} and metrics["combinations"] == list(COMBINATIONS)
    assert set(metrics["test"]) == {"fixed", "random", "natural"}
    assert set(metrics["test"]["fixed"]) == set(COMBINATIONS) | {"mean"}
    assert set(metrics["test"]["random"]) == {f"{r / 10:.1f}" for r in range(8)}
    assert set(metrics["val"]["fixed"]) == set(COMBINATIONS) | {"mean"}
    for split in ("val", "test"):
        fixed = metrics[split]["fixed"]
        for key in ("wa", "ua", "wf1"):
            values = [fixed[c][key] for c in COMBINATIONS]
            assert fixed["mean"][key] == pytest.approx(sum(values) / 7)
    json.dumps(metrics)  # JSON-able as written to reports/metrics.json


def test_mr_zero_equals_natural_protocol(evaluated):
    _, _, result, _ = evaluated
    test = result["metrics"]["test"]
    assert test["random"]["0.0"] == test["natural"]
    preds = result["predictions"]["test"]
    np.testing.assert_array_equal(preds[("random", "0.0")], preds[("natural", "natural")])
    # a higher missing rate really removes modalities: predictions change somewhere
    assert not np.array_equal(preds[("random", "0.5")], preds[("natural", "natural")])


def test_test_rows_read_exactly_once(evaluated):
    _, data, _, reads = evaluated
    test = data.subset("test")
    for m in MODALITY_ORDER:
        rows = data.rows[m][test.positions]
        rows = rows[rows >= 0]
        assert len(rows) > 0
        assert np.all(reads[m][rows] == 1), f"modality {m}: test rows read {np.unique(reads[m][rows])} times"


def test_empty_samples_get_train_prior_and_are_counted(evaluated):
    _, data, result, _ = evaluated
    test = data.subset("test")
    natural = test.view_natural()
    prior = np.bincount(data.subset("train").view_target(), minlength=4) / len(data.subset("train"))
    for i, c in enumerate(COMBINATIONS):
        empty = ~(natural & np.array([m in c for m in MODALITY_ORDER])).any(axis=1)
        assert result["metrics"]["test"]["fixed"][c]["n_empty"] == int(empty.sum())
        out = result["predictions"]["test"][("fixed", c)]
        np.testing.assert_allclose(out[empty], np.tile(prior, (int(empty.sum()), 1)))
    assert result["metrics"]["test"]["natural"]["n_empty"] == 0
    assert result["metrics"]["test"]["fixed"]["v"]["n_empty"] > 0  # the dataset has natural gaps


def test_training_validation_scores_equal_evaluate_val_scores(evaluated, tmp_path):
    """Checkpoint selection and the registry must compare the same number (empties -> prior in both)."""
    from pipeline.training.data import train_prior
    from pipeline.training.lit_module import MCULoRAModule
    from pipeline.train import _trainer, _val_loader

    root, data, result, _ = evaluated
    model, _ = load_model(root / "model.pt")
    module = MCULoRAModule(model, prior=train_prior(data))
    _trainer(1, [], str(tmp_path)).validate(module, _val_loader(data.subset("val"), 16), verbose=False)
    val = result["metrics"]["val"]["fixed"]
    assert sum(val[c]["n_empty"] for c in COMBINATIONS) > 0  # the comparison covers empty samples
    for c in COMBINATIONS:
        for key in ("wa", "ua", "wf1"):
            assert module._last_val_metrics[f"val/{key}/{c}"] == pytest.approx(val[c][key]), (c, key)


def test_natural_protocol_routes_each_sample_to_its_combination(evaluated):
    root, data, result, _ = evaluated
    model, _ = load_model(root / "model.pt")
    test = data.subset("test")
    batch = test.batch(np.arange(len(test)))
    comb = mask_to_index(batch["mask"].numpy())
    with torch.no_grad():
        logits = model(batch["features"], batch["lengths"], batch["mask"], torch.as_tensor(comb)).prediction
    np.testing.assert_allclose(result["predictions"]["test"][("natural", "natural")],
                               torch.softmax(logits, -1).numpy(), rtol=1e-5, atol=1e-6)
    # and routing matters: the same rows forced through the atv adapters give other outputs
    with torch.no_grad():
        forced = model(batch["features"], batch["lengths"], batch["mask"], 6).prediction
    mixed = comb != 6
    assert mixed.any() and not torch.allclose(forced[mixed], logits[mixed])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real SQLite tracking/registry store for the module (creating its schema is the slow part)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("imer", artifact_location=(root / "art").as_uri())
    return uri, client, exp


def test_pyfunc_round_trip_reproduces_direct_output(evaluated, store):
    root, data, result, _ = evaluated
    from pipeline.evaluate import log_to_mlflow
    from pipeline.tracking.runs import fluent_uri

    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    model_uri = log_to_mlflow(result, run_id, uri, root / "model.pt", [])
    assert client.get_run(run_id).data.metrics["test/wa/atv"] == result["metrics"]["test"]["fixed"]["atv"]["wa"]

    val = data.subset("val")
    batch = val.batch(np.arange(len(val)))
    frame = frame_from_arrays({m: x.numpy() for m, x in batch["features"].items()},
                              {m: x.numpy() for m, x in batch["lengths_natural"].items()}, batch["natural"].numpy())
    with fluent_uri(uri):
        served = mlflow.pyfunc.load_model(model_uri).predict(frame)
    model, _ = load_model(root / "model.pt")
    direct = predict_frame(model, frame, result["serving"])
    pd.testing.assert_frame_equal(served.reset_index(drop=True), direct, check_exact=False, rtol=1e-6)
    probs = served[[f"prob_{c}" for c in data.classes]].to_numpy()
    np.testing.assert_allclose(probs, result["predictions"]["val"][("natural", "natural")], rtol=1e-5, atol=1e-6)


def test_regression_metrics_structure(tmp_path):
    _, _, splits, data = _setup(tmp_path, task="regression", n=100)
    result = evaluate_model(tmp_path / "model.pt", data, splits)
    fixed = result["metrics"]["test"]["fixed"]
    assert set(fixed["mean"]) == {"acc2", "f1", "acc7", "mae", "corr"}
    assert fixed["mean"]["mae"] == pytest.approx(np.mean([fixed[c]["mae"] for c in COMBINATIONS]))
    assert result["serving"]["prior"] == [pytest.approx(float(data.subset("train").view_target().mean()))]


def test_run_stage_writes_reports_and_register_promotes(tmp_path, store):
    """evaluate -> register through their stage functions, against a real SQLite store."""
    from pipeline.register import run_stage as register_stage

    manifest, features, splits, data = _setup(tmp_path, n=100)
    uri, client, exp = store
    run_id = client.create_run(exp, tags={"imer.splits_hash": "s123"}).info.run_id
    save_model(tmp_path / "model.pt", _tiny_model(data), {"mlflow_run_id": run_id})  # the run the summary names
    (tmp_path / "train_summary.json").write_text(json.dumps(
        {"mlflow_run_id": run_id, "mlflow_tracking_uri": uri, "selection_metric": "wa", "best_epoch": 3}))
    common = {"train_summary": str(tmp_path / "train_summary.json"), "metrics": str(tmp_path / "reports/metrics.json"),
              "model": str(tmp_path / "model.pt")}
    summary = run_stage({**common, "manifest": str(manifest),
                         "features_dir": str(features), "splits_dir": str(splits),
                         "plots_dir": str(tmp_path / "reports/plots")})
    written = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert written["test"]["fixed"]["mean"] == summary["test_fixed_mean"]
    per_comb = pd.read_csv(tmp_path / "reports/plots/per_combination.csv")
    assert len(per_comb) == 16 and set(per_comb["split"]) == {"val", "test"}  # 7 + mean, per split
    curve = pd.read_csv(tmp_path / "reports/plots/mr_curve.csv")
    assert curve["mr"].tolist() == pytest.approx([r / 10 for r in range(8)])
    confusion = pd.read_csv(tmp_path / "reports/plots/confusion.csv")
    assert len(confusion) == len(data.subset("test")) and set(confusion.columns) == {"actual", "predicted"}
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert "evaluation/mr_curve.png" in artifacts

    decision = register_stage({**common, "model_name": "imer-test", "out": str(tmp_path / "reports/registry.json")})
    registry = json.loads((tmp_path / "reports/registry.json").read_text())
    assert registry["decision"] == "promoted" and set(registry["aliases"]) == {"champion", "challenger"}
    mv = client.get_model_version("imer-test", decision["version"])
    assert float(mv.tags["val_score"]) == pytest.approx(written["val"]["fixed"]["mean"]["wa"])
    assert mv.tags["imer.splits_hash"] == "s123"
    assert json.loads(mv.tags["val_scores"]).keys() == set(COMBINATIONS)


def test_validation_evaluation_and_serving_give_identical_predictions(evaluated, tmp_path):
    """The routing rule is one function: the three callers agree bit for bit on the same rows."""
    from pipeline.tracking.pyfunc import frame_from_arrays, predict_frame
    from pipeline.training.data import train_prior
    from pipeline.training.lit_module import MethodModule
    from pipeline.training.loop import _trainer, _val_loader

    root, data, result, _ = evaluated
    model, _ = load_model(root / "model.pt")
    val = data.subset("val")
    module = MethodModule(model, prior=train_prior(data))
    module.on_validation_epoch_start()
    with torch.no_grad():
        for batch in _val_loader(val, 16):
            module.validation_step(batch, 0)
    for c in COMBINATIONS:  # validation (checkpoint selection) == evaluation, per fixed combination
        np.testing.assert_array_equal(np.concatenate(module._val[c]["out"]), result["predictions"]["val"][("fixed", c)])
    batch = val.batch(np.arange(len(val)))
    frame = frame_from_arrays({m: x.numpy() for m, x in batch["features"].items()},
                              {m: x.numpy() for m, x in batch["lengths_natural"].items()}, batch["natural"].numpy())
    served = predict_frame(model, frame, {"task": "classification", "classes": data.classes,
                                          "prior": train_prior(data)})
    probs = served[[f"prob_{c}" for c in data.classes]].to_numpy()
    np.testing.assert_allclose(probs, result["predictions"]["val"][("natural", "natural")], rtol=0, atol=1e-6)
    assert (served["combination"] != "none").all() or (result["metrics"]["val"]["natural"]["n_empty"] > 0)
