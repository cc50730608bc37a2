"""`imer predict` on real generated clips: every subset of modalities, corrupt files, folders, refusals.

The model is trained on REAL extracted features of a tiny corpus (tests/serving_factory.py),
so the extractors rebuilt from its recipes produce exactly the inputs it expects.
"""
from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from flows.predict import main
from pipeline.core.modalities import MODALITY_ORDER
from pipeline.methods.checkpoint import load_model, save_model
from pipeline.serving.recipes import recipes_from_tables
from tests.serving_factory import clip_files, shared_tiny_model

FAMILIES = ("audio", "text", "video")  # modality order a, t, v
SUBSETS = [s for k in range(1, 4) for s in itertools.combinations(FAMILIES, k)]  # the 7 non-empty subsets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Corrupt inputs the way field data breaks: noise as a wav, a cut mp4, Latin-1 text, nothing at a path."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    (root / "noise.wav").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (root / "cut.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "latin1.txt").write_bytes("très contente, ça va".encode("latin-1"))
    return {"audio": root / "noise.wav", "video": root / "cut.mp4", "text": root / "latin1.txt"}


def _combination(families) -> str:
    return "".join(m for m, f in zip(MODALITY_ORDER, FAMILIES) if f in families)


def _audio_from_video_reason() -> str:
    return "no_audio_track" if shutil.which("ffmpeg") else "no_audio_decoder"  # generated mp4s carry no audio


def test_every_subset_and_nothing_usable_in_one_listing(tiny, bad, tmp_path):
    clips = clip_files(tiny, 0)
    rows = [{"utterance_id": "+".join(s), **{f"{f}_path": str(clips[f]) if f in s else "" for f in FAMILIES}}
            for s in SUBSETS]
    rows.append({"utterance_id": "all_corrupt", **{f"{f}_path": str(bad[f]) for f in FAMILIES}})
    rows.append({"utterance_id": "all_absent", **{f"{f}_path": str(tmp_path / f"gone_{f}") for f in FAMILIES}})
    listing = tmp_path / "listing.csv"
    pd.DataFrame(rows).to_csv(listing, index=False)
    out = tmp_path / "pred.json"
    assert main(["--model", str(tiny["model"]), "--features-dir", str(tiny["features"]),
                 "--listing", str(listing), "--out", str(out)]) == 0
    got = {r["utterance_id"]: r for r in json.loads(out.read_text())}
    _, extra = load_model(tiny["model"])
    classes = extra["classes"]
    for subset in SUBSETS:
        r = got["+".join(subset)]
        assert r["combination"] == _combination(subset) and not r["used_prior"], r
        for f in FAMILIES:
            want = "present" if f in subset else ("no_path" if not (f == "audio" and "video" in subset)
                                                  else _audio_from_video_reason())
            assert r[f"{f}_status"] == want, (subset, f, r)
        probs = [r[f"prob_{c}"] for c in classes]
        assert abs(sum(probs) - 1) < 1e-5 and r["label"] == classes[int(np.argmax(probs))]
    for uid, reasons in (("all_corrupt", {"audio": "unreadable_audio", "text": "undecodable_text",
                                          "video": "unreadable_video"}),
                         ("all_absent", dict.fromkeys(FAMILIES, "file_absent"))):
        r = got[uid]
        assert r["used_prior"] and r["combination"] == "none"
        assert [r[f"prob_{c}"] for c in classes] == pytest.approx(extra["prior"])
        assert {f: r[f"{f}_status"] for f in FAMILIES} == reasons
        assert all(r[f"{f}_detail"] for f in FAMILIES)  # the message names the file


def test_single_utterance_prints_a_table(tiny, capsys):
    clips = clip_files(tiny, 1)
    rc = main(["--model", str(tiny["model"]), "--features-dir", str(tiny["features"]),
               "--audio", str(clips["audio"]), "--video", str(clips["video"]), "--text", str(clips["text"])])
    out = capsys.readouterr().out
    assert rc == 0
    header, row = out.strip().splitlines()
    assert header.split()[:2] == ["utterance_id", "label"] and "_detail" not in header
    assert row.split()[0] == clips["audio"].stem and " atv " in row


def test_folder_groups_files_by_stem_and_writes_csv_and_parquet(tiny, bad, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    clips = clip_files(tiny, 2)
    for f in FAMILIES:
        shutil.copy(clips[f], folder / f"both{clips[f].suffix}")
    shutil.copy(clips["text"], folder / "textonly.txt")
    shutil.copy(bad["audio"], folder / "broken.wav")
    shutil.copy(clips["text"], folder / "broken.txt")
    (folder / "notes.md").write_text("not a clip")
    frames = []
    for name in ("pred.csv", "pred.parquet"):
        assert main(["--model", str(tiny["model"]), "--features-dir", str(tiny["features"]),
                     "--folder", str(folder), "--out", str(tmp_path / name)]) == 0
        frames.append(pd.read_csv(tmp_path / name) if name.endswith("csv") else pd.read_parquet(tmp_path / name))
    for got in frames:
        got = got.set_index("utterance_id")
        assert sorted(got.index) == ["both", "broken", "textonly"]
        assert got.loc["both", "combination"] == "atv" and got.loc["textonly", "combination"] == "t"
        assert got.loc["broken", "combination"] == "t" and got.loc["broken", "audio_status"] == "unreadable_audio"
    assert frames[0]["prob_happy"].to_numpy() == pytest.approx(frames[1]["prob_happy"].to_numpy(), abs=1e-9)


def test_recipes_stored_in_the_checkpoint_need_no_feature_tables(tiny, tmp_path):
    """With `feature_recipes` in the checkpoint (as training can store them) no features dir is read."""
    model, extra = load_model(tiny["model"])
    recipes = recipes_from_tables(tiny["features"], extra["feature_config_hashes"])
    assert set(recipes) == set(MODALITY_ORDER)
    path = tmp_path / "with_recipes.pt"
    save_model(path, model, {**extra, "feature_recipes": recipes})
    clips = clip_files(tiny, 0)
    out = tmp_path / "p.json"
    assert main(["--model", str(path), "--features-dir", str(tmp_path / "nothing_here"),
                 "--text", str(clips["text"]), "--out", str(out)]) == 0
    assert json.loads(out.read_text())[0]["combination"] == "t"


def test_changed_extractor_config_is_refused(tiny, tmp_path, capsys):
    model, extra = load_model(tiny["model"])
    recipes = recipes_from_tables(tiny["features"], extra["feature_config_hashes"])
    recipes["a"] = {**recipes["a"], "segments": 8}  # features made this way are not the model's inputs
    path = tmp_path / "drifted.pt"
    save_model(path, model, {**extra, "feature_recipes": recipes})
    clips = clip_files(tiny, 0)
    assert main(["--model", str(path), "--features-dir", str(tmp_path), "--text", str(clips["text"])]) == 1
    err = capsys.readouterr().err
    assert "acoustic extractor: config hash" in err and extra["feature_config_hashes"]["a"] in err


def test_model_without_recipes_is_a_clear_error(tiny, tmp_path, capsys):
    model, extra = load_model(tiny["model"])
    path = tmp_path / "bare.pt"
    save_model(path, model, {k: v for k, v in extra.items() if k != "feature_recipes"})
    rc = main(["--model", str(path), "--features-dir", str(tmp_path), "--text", str(clip_files(tiny)["text"])])
    assert rc == 1 and "no extractor recipes" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--folder", "x", "--text", "y.txt"], ["--text", "y.txt", "--out", "p.xlsx"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(["--model", "m.pt", *argv])
    assert exc.value.code == 2


def test_folder_with_two_files_of_one_modality_is_a_usage_error(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"a")
    (tmp_path / "x.avi").write_bytes(b"b")
    with pytest.raises(SystemExit) as exc:
        main(["--model", "m.pt", "--folder", str(tmp_path)])
    assert exc.value.code == 2


def test_feature_rows_and_media_rows_give_the_same_prediction(tiny):
    """The served feature-row path and the media path are one prediction function."""
    from pipeline.methods.routing import serving_info
    from pipeline.serving.media import MediaItem
    from pipeline.serving.predict import Predictor, frame_from_arrays
    from pipeline.serving.recipes import model_recipes

    model, extra = load_model(tiny["model"])
    pred = Predictor(model, serving_info(extra["task"], extra["classes"], extra["prior"]),
                     model_recipes(extra, tiny["features"]), extra["feature_config_hashes"])
    clips = clip_files(tiny, 3)
    items = [MediaItem("u", {"audio": clips["audio"], "text": clips["text"]})]
    by_media = pred.predict_items(items)
    got = pred.media().extract(items)
    by_rows = pred.predict_features(frame_from_arrays(got.features, got.lengths, got.present))
    assert by_media["combination"].tolist() == by_rows["combination"].tolist() == ["at"]
    cols = [f"prob_{c}" for c in extra["classes"]]
    assert by_media[cols].to_numpy() == pytest.approx(by_rows[cols].to_numpy(), abs=1e-6)
    assert torch.is_grad_enabled()  # routing's no_grad does not leak


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="no ffmpeg: audio inside a video is reported as no_audio_decoder")
def test_audio_inside_an_mp4_is_used_when_a_decoder_is_installed(tiny, tmp_path):
    import subprocess

    clips = clip_files(tiny, 0)
    muxed = tmp_path / "with_audio.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(clips["video"]), "-i", str(clips["audio"]),
                    "-c:v", "copy", "-c:a", "aac", "-shortest", str(muxed)], check=True)
    out = tmp_path / "p.json"
    assert main(["--model", str(tiny["model"]), "--features-dir", str(tiny["features"]),
                 "--video", str(muxed), "--out", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    assert row["audio_status"] == "present" and row["combination"] == "av"


def test_imported_features_have_no_extractor_to_rebuild(tiny, tmp_path, capsys):
    """A model trained on imported benchmark features says it answers feature rows only."""
    model, extra = load_model(tiny["model"])
    imported = {"name": "import", "format": "gcnet", "dataset": "iemocap"}
    path = tmp_path / "imported.pt"
    save_model(path, model, {**extra, "feature_recipes": dict.fromkeys(MODALITY_ORDER, imported)})
    rc = main(["--model", str(path), "--features-dir", str(tmp_path), "--text", str(clip_files(tiny)["text"])])
    assert rc == 1 and "not made by an extractor" in capsys.readouterr().err
