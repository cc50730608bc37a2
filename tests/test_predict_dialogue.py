"""Prediction on dialogues: `dialogue` / `turn` / `speaker` input columns, one prediction per utterance.

Two tiny models trained once for the module on the same feature dataset with dialogues
(tests/factories.py, `dialogue_turns=8`): one with `train.context: dialogue`, one with
`utterance`. Real parts: real checkpoints, a real MLflow SQLite store for the pyfunc.
"""
from __future__ import annotations

import json
import tempfile

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core.modalities import MODALITY_ORDER
from pipeline.methods.checkpoint import load_model
from pipeline.methods.context import dense_layout
from pipeline.methods.routing import route, serving_info
from pipeline.serving.dialogues import read_conversations
from pipeline.serving.predict import Predictor, frame_from_arrays, predict_arrays
from pipeline.splits import build_splits
from pipeline.train import train_model
from pipeline.training.data import MultimodalData
from tests.factories import make_feature_dataset

TINY = {"seed": 5, "max_epochs": 1, "batch_size": 32, "stage1_epochs": 1, "num_threads": 1,
        "model": {"d_model": 16, "d_fusion": 32, "n_heads": 2}, "dpft": {"monitor_size": 32},
        "mlflow": {"enabled": False}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The dataset, a dialogue-context model and an utterance model, each with its Predictor."""
    root = tmp_path_factory.mktemp("dialogue_predict")
    manifest, features = make_feature_dataset(root, n=80, dialogue_turns=8, missing_share=0.15, seed=8)
    build_splits(manifest, features, root / "splits", {"seed": 1})
    train_view = MultimodalData.load(manifest, features, root / "splits", include=("train", "val"))
    out = {"data": MultimodalData.load(manifest, features, root / "splits")}
    for context in ("dialogue", "utterance"):
        train_model(train_view, {**TINY, "context": context}, root / context)
        path = root / context / "models" / "model.pt"
        model, extra = load_model(path)
        assert model.config.context == context
        serving = serving_info(extra["task"], extra["classes"], extra["prior"])
        out[context] = {"path": path, "model": model, "serving": serving, "predictor": Predictor(model, serving)}
    return out


def _rows(data: MultimodalData, dialogues: list[str]) -> np.ndarray:
    """Dataset rows of the given dialogues, in dataset order."""
    return np.flatnonzero(np.isin(data.dialogue, dialogues))


def _frame(data: MultimodalData, rows: np.ndarray, with_dialogue: bool = True) -> pd.DataFrame:
    """Feature rows of dataset `rows` (in that order), with their conversation columns."""
    batch = data.batch(rows)
    conversation = ({"dialogue": data.dialogue[rows].tolist(), "turn": data.turn[rows].tolist(),
                     "speaker": data.speaker[rows].tolist()} if with_dialogue else None)
    return frame_from_arrays({m: x.numpy() for m, x in batch["features"].items()},
                             {m: x.numpy() for m, x in batch["lengths_natural"].items()},
                             batch["natural"].numpy(), conversation)


def _probs(frame: pd.DataFrame) -> np.ndarray:
    return frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()  # (N, K)


def _two_dialogues(data: MultimodalData) -> list[str]:
    ids, counts = np.unique(data.dialogue, return_counts=True)
    return ids[counts >= 4][:2].tolist()


def test_a_dialogue_is_predicted_as_route_sees_it_in_one_batch(world):
    data, dm = world["data"], world["dialogue"]
    rows = _rows(data, _two_dialogues(data))
    got = dm["predictor"].predict_features(_frame(data, rows))
    batch = data.batch(rows)
    layout = dense_layout(data.dialogue[rows], data.turn[rows], data.speaker[rows])
    ref = route(dm["model"], batch["features"], batch["lengths_natural"], batch["natural"].numpy(),
                np.ones(3, dtype=bool), dm["serving"]["prior"], dialogue=layout)
    assert _probs(got) == pytest.approx(ref.output, abs=1e-6)
    assert got["dialogue"].tolist() == data.dialogue[rows].tolist()  # echoed, input order
    assert got["turn"].tolist() == data.turn[rows].tolist()


def test_context_is_read_by_dialogue_models_and_ignored_by_utterance_models(world):
    data = world["data"]
    rows = _rows(data, _two_dialogues(data)[:1])
    with_ctx, alone = _frame(data, rows), _frame(data, rows, with_dialogue=False)
    dm, um = world["dialogue"]["predictor"], world["utterance"]["predictor"]
    # the same utterances inside their dialogue vs each a dialogue of one
    assert np.abs(_probs(dm.predict_features(with_ctx)) - _probs(dm.predict_features(alone))).max() > 1e-4
    u_ctx, u_alone = um.predict_features(with_ctx), um.predict_features(alone)
    assert np.array_equal(_probs(u_ctx), _probs(u_alone))
    assert u_ctx["label"].tolist() == u_alone["label"].tolist() and "dialogue" in u_ctx and "dialogue" not in u_alone


def test_interleaved_dialogues_equal_each_dialogue_alone_and_keep_input_order(world):
    data, dm = world["data"], world["dialogue"]["predictor"]
    first, second = (_rows(data, [d]) for d in _two_dialogues(data))
    alone = {d: _probs(dm.predict_features(_frame(data, r))) for d, r in (("a", first), ("b", second))}
    mixed = np.random.default_rng(0).permutation(np.r_[first, second])  # rows shuffled: turns give the order
    got = _probs(dm.predict_features(_frame(data, mixed)))
    for k, row in enumerate(mixed):
        which, at = ("a", first) if row in first else ("b", second)
        assert got[k] == pytest.approx(alone[which][int(np.flatnonzero(at == row)[0])], abs=1e-6)


def test_batches_never_split_a_dialogue(world):
    data, dm = world["data"], world["dialogue"]
    rows = _rows(data, _two_dialogues(data))
    frame = _frame(data, rows)
    conv = read_conversations(frame)
    batch = data.batch(rows)
    args = (dm["model"], batch["features"], batch["lengths_natural"], batch["natural"].numpy(), dm["serving"], conv)
    whole = predict_arrays(*args, batch_size=len(rows))
    assert _probs(predict_arrays(*args, batch_size=2)) == pytest.approx(_probs(whole), abs=1e-6)


def test_a_row_without_dialogue_is_a_dialogue_of_one(world):
    data, dm = world["data"], world["dialogue"]["predictor"]
    rows = _rows(data, _two_dialogues(data)[:1])
    frame = _frame(data, rows)
    frame["dialogue"] = [None, *frame["dialogue"][1:]]  # the first row leaves the conversation
    frame["turn"] = [None, *frame["turn"][1:]]
    lone = dm.predict_features(_frame(data, rows[:1], with_dialogue=False))
    rest = dm.predict_features(_frame(data, rows[1:]))
    got = dm.predict_features(frame)
    assert _probs(got)[0] == pytest.approx(_probs(lone)[0], abs=1e-6)
    assert _probs(got)[1:] == pytest.approx(_probs(rest), abs=1e-6)


def test_speakers_change_the_context(world):
    data, dm = world["data"], world["dialogue"]["predictor"]
    frame = _frame(data, _rows(data, _two_dialogues(data)[:1]))
    one_speaker = frame.assign(speaker="same")
    alternating = frame.assign(speaker=["A" if k % 2 else "B" for k in range(len(frame))])
    assert np.abs(_probs(dm.predict_features(one_speaker)) - _probs(dm.predict_features(alternating))).max() > 1e-6


@pytest.mark.parametrize("columns, message", [
    ({"turn": [0, 1]}, "'turn' without a 'dialogue'"),
    ({"dialogue": ["d", "d"], "turn": [0, -1]}, "row 2, column 'turn': '-1' is not a whole number"),
    ({"dialogue": ["d", "d"], "turn": [0, 1.5]}, "'1.5' is not a whole number"),
    ({"dialogue": ["d", "d"], "turn": ["0", "two"]}, "'two' is not a whole number"),
    ({"dialogue": ["d", "d"], "turn": [0, None]}, "row 2, column 'turn': empty on a row of a dialogue"),
    ({"dialogue": ["d", None], "turn": [0, 3]}, "row 2, column 'turn': '3' on a row without a dialogue"),
])
def test_bad_conversation_columns_are_clear_errors(columns, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        read_conversations(pd.DataFrame(columns), "req.json")


def test_conversation_columns_as_numbers_text_or_missing():
    frame = pd.DataFrame({"dialogue": [7, "7", None, 8.0], "turn": ["1", 0, None, 2.0], "speaker": [None, "x", "y", 3]})
    conv = read_conversations(frame)
    assert conv.group[0] == conv.group[1] and len(set(conv.group.tolist())) == 3  # 7 and "7" are one dialogue
    assert conv.turn.tolist() == [1, 0, 0, 2] and conv.speaker.tolist() == ["", "x", "y", "3"]
    assert read_conversations(pd.DataFrame({"speaker": ["a"]})) is None


def test_logged_pyfunc_predicts_a_dialogue_frame(world, tmp_path):
    from pipeline.tracking.pyfunc import log_pyfunc_model
    from pipeline.tracking.runs import fluent_uri

    data, dm = world["data"], world["dialogue"]
    rows = _rows(data, _two_dialogues(data))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("dialogue", artifact_location=str(tmp_path / "artifacts"))
    with fluent_uri(uri):
        with mlflow.start_run(experiment_id=exp), tempfile.TemporaryDirectory() as tmp:
            info = log_pyfunc_model(dm["path"], dm["serving"], _frame(data, rows[:2], with_dialogue=False), tmp,
                                    features_dir=None)
        served = mlflow.pyfunc.load_model(info.model_uri)
        local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "copy"))
    inputs = {c["name"]: c for c in json.loads(yaml.safe_load(open(f"{local}/MLmodel"))["signature"]["inputs"])}
    assert all(not inputs[c]["required"] for c in ("dialogue", "turn", "speaker"))
    frame = _frame(data, rows)
    codes = {d: k for k, d in enumerate(dict.fromkeys(frame["dialogue"]))}
    frame["dialogue"] = [codes[d] for d in frame["dialogue"]]  # integer ids pass the signature too
    got = served.predict(frame)
    assert _probs(got) == pytest.approx(_probs(dm["predictor"].predict_features(frame)), abs=1e-6)
    alone = served.predict(frame.drop(columns=["dialogue", "turn", "speaker"]))
    assert np.abs(_probs(got) - _probs(alone)).max() > 1e-4  # the columns reached the model
    assert got["dialogue"].tolist() == frame["dialogue"].tolist()


def test_frame_from_arrays_refuses_unknown_conversation_columns():
    feats = {m: np.zeros((1, 2, 3), np.float32) for m in MODALITY_ORDER}
    lens = {m: np.array([2]) for m in MODALITY_ORDER}
    with pytest.raises(ValueError, match="'session' is not one of"):
        frame_from_arrays(feats, lens, np.ones((1, 3), bool), {"session": ["s"]})


@pytest.mark.slow  # shares the real-extractor tiny model with tests/test_predict.py (~35 s alone)
def test_imer_predict_reads_a_listing_with_dialogue_columns(tmp_path_factory, tmp_path, capsys):
    """`imer predict --listing` with dialogue/turn/speaker: the media path equals the feature-row path."""
    from flows.predict import main
    from pipeline.serving.media import items_from_listing
    from pipeline.serving.recipes import model_recipes
    from tests.serving_factory import TRAIN_FAST, clip_files, shared_tiny_model

    tiny = shared_tiny_model(tmp_path_factory)
    view = MultimodalData.load(tiny["manifest"], tiny["features"], tiny["root"] / "splits", include=("train", "val"))
    train_model(view, {**TRAIN_FAST, "max_epochs": 1, "context": "dialogue", "mlflow": {"enabled": False}},
                tmp_path / "dialogue")
    path = tmp_path / "dialogue" / "models" / "model.pt"
    rows = []
    for k in range(5):  # d1: clips 0-2 given in reverse turn order; clips 3-4 in d2
        clips = clip_files(tiny, k)
        rows.append({"utterance_id": f"u{k}", **{f"{f}_path": str(p) for f, p in clips.items()},
                     "dialogue": "d1" if k < 3 else "d2", "turn": str(2 - k if k < 3 else k - 3),
                     "speaker": "A" if k % 2 else "B"})
    listing, out = tmp_path / "listing.csv", tmp_path / "pred.json"
    pd.DataFrame(rows).to_csv(listing, index=False)
    assert main(["--model", str(path), "--features-dir", str(tiny["features"]), "--listing", str(listing),
                 "--out", str(out)]) == 0
    got = pd.DataFrame(json.loads(out.read_text()))
    assert got["utterance_id"].tolist() == [f"u{k}" for k in range(5)] and got["dialogue"].tolist()[:3] == ["d1"] * 3
    model, extra = load_model(path)
    pred = Predictor(model, serving_info(extra["task"], extra["classes"], extra["prior"]),
                     model_recipes(extra, tiny["features"]), extra["feature_config_hashes"])
    items = items_from_listing(listing)
    media = pred.media().extract(items)
    conversation = {c: [r[c] for r in rows] for c in ("dialogue", "turn", "speaker")}
    by_rows = pred.predict_features(frame_from_arrays(media.features, media.lengths, media.present, conversation))
    assert _probs(got) == pytest.approx(_probs(by_rows), abs=1e-6)
    alone = pred.predict_features(frame_from_arrays(media.features, media.lengths, media.present))
    assert np.abs(_probs(got) - _probs(alone)).max() > 1e-4
    served = pred.predict(pd.DataFrame(rows))  # the served media-row path (paths + conversation columns)
    assert _probs(served) == pytest.approx(_probs(got), abs=1e-6) and served["turn"].tolist() == conversation["turn"]
    pd.DataFrame([{**rows[0], "turn": "first"}]).to_csv(listing, index=False)
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(path), "--features-dir", str(tiny["features"]), "--listing", str(listing)])
    assert exc.value.code == 2 and f"{listing}: row 1, column 'turn': 'first'" in capsys.readouterr().err
