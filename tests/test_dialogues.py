"""Conversation structure in the data: manifest columns, ingest, corpus dialogues and inertia, importers, splits."""
from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.corpus import dialogues
from pipeline.corpus.config import CorpusConfig
from pipeline.corpus.generate import plan_corpus
from pipeline.formats.manifest import DIALOGUE_COLUMNS, manifest_meta, read_dialogues, read_manifest, write_manifest
from pipeline.importers import mmsa
from pipeline.ingest import ingest
from pipeline.splits import build_splits
from tests.corpus_factory import make_tiny_corpus
from tests.factories import make_feature_dataset

CLASSES = ["neutral", "happy", "sad", "angry"]
# sha256 of the JSON job list of plan_corpus(CorpusConfig(utterances=97, sessions=3, speakers_per_session=3,
# seed=3)) computed with the generator before dialogues existed (today's independent utterances).
PLAN_BEFORE_DIALOGUES = "a45627627ae29f8da2b9458fb4172393475576c18bc549522c619fd84e85012f"
SMALL = {"utterances": 97, "sessions": 3, "speakers_per_session": 3, "seed": 3}


def _clip_fields(jobs: list[dict]) -> list[dict]:
    return [{k: v for k, v in j.items() if k not in DIALOGUE_COLUMNS} for j in jobs]


def _by_dialogue(jobs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for j in jobs:
        out[j["dialogue"]].append(j)
    return {d: sorted(v, key=lambda j: j["turn"]) for d, v in out.items()}


def _same_as_previous(jobs: list[dict]) -> float:
    pairs = [(a["label"], b["label"]) for turns in _by_dialogue(jobs).values() for a, b in zip(turns, turns[1:])]
    return sum(a == b for a, b in pairs) / len(pairs)


# --- corpus: dialogues and inertia -------------------------------------------------------------


def test_inertia_zero_plans_exactly_todays_clips(monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = plan_corpus(CorpusConfig(**SMALL))
    digest = hashlib.sha256(json.dumps(_clip_fields(jobs), sort_keys=True).encode()).hexdigest()
    assert digest == PLAN_BEFORE_DIALOGUES
    # and with the dialogue code path switched off: the same clips, the same label statistics
    for config in (CorpusConfig(**SMALL), CorpusConfig(shifted_domain=True)):
        with monkeypatch.context() as patch:
            patch.setattr(dialogues, "arrange_dialogues", lambda *a, **k: None)
            without = plan_corpus(config)
        with_dialogues = plan_corpus(config)
        assert _clip_fields(with_dialogues) == without
        per_speaker = lambda js: Counter((j["speaker"]["speaker_id"], j["label"]) for j in js)  # noqa: E731
        assert per_speaker(with_dialogues) == per_speaker(without)


def test_dialogues_alternate_two_speakers_of_one_session() -> None:
    jobs = plan_corpus(CorpusConfig(shifted_domain=True))  # 5 + 2 sessions x 2 speakers
    turns_of = _by_dialogue(jobs)
    lengths = [len(t) for t in turns_of.values()]
    assert 10 <= np.mean(lengths) <= 14  # dialogue_turns 12 on average
    for name, turns in turns_of.items():
        assert [j["turn"] for j in turns] == list(range(len(turns))), name
        assert len({j["speaker"]["session"] for j in turns}) == 1 and len({j["domain"] for j in turns}) == 1
        speakers = [j["speaker"]["speaker_id"] for j in turns]
        assert len(set(speakers)) <= 2
        if len(set(speakers)) == 2:
            assert all(a != b for a, b in zip(speakers, speakers[1:])), name  # they take turns
    # each speaker's clips are used in their planned order across the session's dialogues
    for speaker in {j["speaker"]["speaker_id"] for j in jobs}:
        mine = [j for j in jobs if j["speaker"]["speaker_id"] == speaker]
        order = sorted(mine, key=lambda j: (j["dialogue"], j["turn"]))
        assert [j["utterance_id"] for j in order] == sorted(j["utterance_id"] for j in mine)
    # three speakers per session still give two-speaker dialogues
    assert all(len({j["speaker"]["speaker_id"] for j in t}) <= 2 for t in _by_dialogue(plan_corpus(CorpusConfig(**SMALL))).values())
    one_each = plan_corpus(CorpusConfig(**{**SMALL, "dialogue_turns": 1}))
    assert all(j["turn"] == 0 for j in one_each) and len({j["dialogue"] for j in one_each}) == len(one_each)


@pytest.mark.parametrize("seed", [20261123, 5])
def test_inertia_repeats_emotions_along_turns_and_keeps_classes_balanced(seed: int) -> None:
    base = plan_corpus(CorpusConfig(seed=seed))
    shares = {}
    for inertia in (0.0, 0.3, 0.6):
        jobs = plan_corpus(CorpusConfig(seed=seed, inertia=inertia))
        # only labels move: ids, durations, breakage, dialogue structure stay
        assert [(j["utterance_id"], j["n_frames"], j["breakage"], j["dialogue"], j["turn"]) for j in jobs] == \
            [(j["utterance_id"], j["n_frames"], j["breakage"], j["dialogue"], j["turn"]) for j in base]
        counts = Counter(j["label"] for j in jobs)
        assert all(0.2 <= counts[c] / len(jobs) <= 0.3 for c in CLASSES), (inertia, counts)
        shares[inertia] = _same_as_previous(jobs)
        for turns in _by_dialogue(jobs).values():  # a first turn always keeps its independent draw
            first = turns[0]
            assert first["label"] == next(b for b in base if b["utterance_id"] == first["utterance_id"])["label"]
    assert abs(shares[0.0] - 0.25) < 0.05  # 4 balanced classes, independent: about 1 in 4 repeats
    assert shares[0.3] > shares[0.0] + 0.08 and shares[0.6] > shares[0.3] + 0.1, shares


def test_config_checks_dialogue_knobs() -> None:
    with pytest.raises(ValueError, match="corpus.inertia"):
        CorpusConfig.from_dict({"inertia": 1.5})
    with pytest.raises(ValueError, match="corpus.dialogue_turns"):
        CorpusConfig.from_dict({"dialogue_turns": 0})
    assert CorpusConfig().inertia == 0.0 and CorpusConfig().dialogue_turns == 12


def test_listing_and_manifest_carry_dialogues(tmp_path: Path) -> None:
    listing = make_tiny_corpus(tmp_path / "corpus", n=12, seed=4, inertia=0.5, dialogue_turns=4)
    recorded = json.loads((tmp_path / "corpus" / "corpus.json").read_text())
    assert recorded["config"]["inertia"] == 0.5 and recorded["config"]["dialogue_turns"] == 4
    assert recorded["counts"]["dialogues"] >= 2 and 0 <= recorded["counts"]["same_emotion_as_previous_turn"] <= 1
    table = pq.read_table(listing)
    assert table.schema.field("turn").type == pa.int64() and table.schema.field("dialogue").type == pa.string()
    ingest(listing, tmp_path / "manifest.parquet", classes=CLASSES, project_root=tmp_path)
    manifest, _ = read_manifest(tmp_path / "manifest.parquet")
    assert manifest.column("dialogue").to_pylist() == table.column("dialogue").to_pylist()
    assert manifest.column("turn").to_pylist() == table.column("turn").to_pylist()
    dialogue, turn = read_dialogues(manifest)
    assert len(set(dialogue.tolist())) == recorded["counts"]["dialogues"] and turn.dtype == np.int64


# --- manifest --------------------------------------------------------------------------------------


def _manifest_table(n: int = 4, **extra: list) -> pa.Table:
    cols = {"utterance_id": [f"u{i}" for i in range(n)], "session": ["S1"] * n, "speaker": ["a", "b"] * (n // 2),
            "label": ["happy"] * n, "score": [None] * n, "domain": ["source"] * n}
    cols.update({c: [None] * n for c in ("audio_path", "text_path", "video_path", "audio_missing", "text_missing", "video_missing")})
    cols.update(extra)
    return pa.table({k: v if isinstance(v, pa.Array) else pa.array(v, pa.float64() if k == "score" else None if k in extra else pa.string())
                     for k, v in cols.items()})


def test_read_dialogues_defaults_and_types(tmp_path: Path) -> None:
    meta = manifest_meta("classification", ["happy"], "test")
    old = _manifest_table()
    ids, turns = read_dialogues(old)  # no columns: each utterance its own dialogue at turn 0
    assert ids.tolist() == ["u0", "u1", "u2", "u3"] and turns.tolist() == [0, 0, 0, 0] and turns.dtype == np.int64
    path = tmp_path / "m.parquet"
    # integer dialogue ids and int32 turns are stored as string / int64; a null dialogue is a dialogue of its own
    write_manifest(_manifest_table(dialogue=pa.array([7, 7, None, 8]), turn=pa.array([1, 0, None, 2], pa.int32())), path, meta)
    table, _ = read_manifest(path)
    assert table.schema.field("dialogue").type == pa.string() and table.schema.field("turn").type == pa.int64()
    ids, turns = read_dialogues(table)
    assert ids.tolist() == ["7", "7", "u2", "8"] and turns.tolist() == [1, 0, 0, 2]


@pytest.mark.parametrize("extra, message", [
    ({"turn": [0, 1, 2, 3]}, "'turn' column but no 'dialogue'"),
    ({"dialogue": ["d"] * 4, "turn": [0, 1, -1, 2]}, "negative"),
    ({"dialogue": ["d", None, "d", "d"], "turn": [0, 1, 2, 3]}, "'turn' but no 'dialogue'.*'u1'"),
])
def test_write_manifest_refuses_bad_turns(tmp_path: Path, extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        write_manifest(_manifest_table(**extra), tmp_path / "m.parquet", manifest_meta("classification", ["happy"], "t"))
    assert "m.parquet" in str(err.value) and not (tmp_path / "m.parquet").exists()


# --- ingest -------------------------------------------------------------------------------------------


HEADER = "utterance_id,session,speaker,label,text_path,dialogue,turn"


def _listing(tmp_path: Path, lines: list[str], header: str = HEADER) -> Path:
    (tmp_path / "t.txt").write_text("hello", encoding="utf-8")
    path = tmp_path / "listing.csv"
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def test_ingest_writes_dialogue_columns(tmp_path: Path) -> None:
    listing = _listing(tmp_path, ["u1,S1,a,happy,t.txt,conv1,0", "u2,S1,b,sad,t.txt,conv1,1", "u3,S1,a,sad,t.txt,,"])
    ingest(listing, tmp_path / "m.parquet", classes=CLASSES, project_root=tmp_path)
    table, _ = read_manifest(tmp_path / "m.parquet")
    assert table.column("dialogue").to_pylist() == ["conv1", "conv1", None]
    assert table.column("turn").to_pylist() == [0, 1, None] and table.schema.field("turn").type == pa.int64()
    assert read_dialogues(table)[0].tolist() == ["conv1", "conv1", "u3"]
    plain = _listing(tmp_path, ["u1,S1,a,happy,t.txt"], header="utterance_id,session,speaker,label,text_path")
    ingest(plain, tmp_path / "p.parquet", classes=CLASSES, project_root=tmp_path)
    assert not set(DIALOGUE_COLUMNS) & set(read_manifest(tmp_path / "p.parquet")[0].column_names)  # old listings: old manifests


def test_ingest_names_bad_turns_by_row(tmp_path: Path) -> None:
    listing = _listing(tmp_path, ["u1,S1,a,happy,t.txt,c,x", "u2,S1,a,happy,t.txt,c,-1", "u3,S1,a,happy,t.txt,c,1.5",
                                  "u4,S1,a,happy,t.txt,,2", "u5,S1,a,happy,t.txt,c,3"])
    with pytest.raises(ValueError) as err:
        ingest(listing, tmp_path / "m.parquet", classes=CLASSES, project_root=tmp_path)
    message = str(err.value)
    assert "listing.csv" in message and "4 invalid value(s)" in message
    assert "line 2, data row 1, column 'turn': 'x' is not a non-negative integer" in message
    assert "data row 2, column 'turn': '-1'" in message and "data row 3, column 'turn': '1.5'" in message
    assert "data row 4, column 'turn': given without a dialogue" in message
    report = ingest(listing, tmp_path / "m.parquet", classes=CLASSES, on_bad_row="skip", project_root=tmp_path)
    assert report.utterances == 1 and read_manifest(tmp_path / "m.parquet")[0].column("turn").to_pylist() == [3]


def test_parquet_listing_turns_keep_integers(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hi", encoding="utf-8")
    rows = {"utterance_id": ["u1", "u2"], "session": ["S"] * 2, "speaker": ["a", "b"], "label": ["sad"] * 2,
            "text_path": ["t.txt"] * 2, "dialogue": ["c", "c"], "turn": [1.0, 0.0]}
    pq.write_table(pa.table(rows), tmp_path / "l.parquet")
    ingest(tmp_path / "l.parquet", tmp_path / "m.parquet", classes=CLASSES, project_root=tmp_path)
    assert read_manifest(tmp_path / "m.parquet")[0].column("turn").to_pylist() == [1, 0]


# --- importers ------------------------------------------------------------------------------------------


def test_mmsa_dialogue_is_the_video_and_turn_the_clip() -> None:
    videos, turns = mmsa.dialogue_turns(["v1$_$3", "v1$_$1", "v2$_$10", "w$_$a", "w$_$b", "plain"])
    assert videos == ["v1", "v1", "v2", "w", "w", "plain"]
    assert turns == [3, 1, 10, 0, 1, 0]  # a non-numeric clip part: numbered in file order


# --- splits -----------------------------------------------------------------------------------------------


def _with_columns(manifest: Path, dialogue: list, turn: list) -> None:
    table, meta = read_manifest(manifest)
    table = table.drop_columns([c for c in DIALOGUE_COLUMNS if c in table.column_names])
    table = table.append_column("dialogue", pa.array(dialogue, pa.string())).append_column("turn", pa.array(turn, pa.int64()))
    write_manifest(table, manifest, meta)


def _two_speaker_dialogues(manifest: Path, per_dialogue: int = 6) -> None:
    """Rewrite a factory manifest so each session's rows form dialogues of its two speakers."""
    table, _ = read_manifest(manifest)
    sessions = table.column("session").to_pylist()
    counter: Counter[str] = Counter()
    dialogue, turn = [], []
    for s in sessions:
        k = counter[s]
        counter[s] += 1
        dialogue.append(f"{s}_d{k // per_dialogue}")
        turn.append(k % per_dialogue)
    _with_columns(manifest, dialogue, turn)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("conv")
    manifest, features = make_feature_dataset(root, n=120, sessions=5, seed=2, split_column=True)
    _two_speaker_dialogues(manifest)
    return manifest, features


def test_by_session_keeps_dialogues_whole_and_counts_them(conversations, tmp_path: Path) -> None:
    manifest, features = conversations
    summary = build_splits(manifest, features, tmp_path, {"seed": 1, "strategy": "by_session"})
    table, _ = read_manifest(manifest)
    n_dialogues = len(set(table.column("dialogue").to_pylist()))
    assert sum(c["dialogues"] for c in summary["counts"].values()) == n_dialogues
    assert all(c["dialogues"] >= 1 for c in summary["counts"].values())


def test_by_speaker_refuses_two_speaker_dialogues(conversations, tmp_path: Path) -> None:
    manifest, features = conversations
    table, _ = read_manifest(manifest)
    assert len(set(table.column("speaker").to_pylist())) > len(set(table.column("session").to_pylist()))
    with pytest.raises(ValueError, match=r"dialogue 'Ses\d+_d\d+' in \['[a-z]+', '[a-z]+'\].*by_session"):
        build_splits(manifest, features, tmp_path, {"seed": 1, "strategy": "by_speaker"})
    assert not (tmp_path / "assignment.parquet").exists()


def test_manifest_split_column_cutting_a_dialogue_is_refused(tmp_path: Path) -> None:
    manifest, features = make_feature_dataset(tmp_path / "d", n=60, sessions=5, seed=4, split_column=True)
    table, _ = read_manifest(manifest)
    split = table.column("split").to_pylist()
    crossing = [split.index("train"), split.index("test")]  # one dialogue over a train row and a test row
    dialogue = [("cut" if i in crossing else None) for i in range(len(split))]
    _with_columns(manifest, dialogue, [0 if d else None for d in dialogue])
    with pytest.raises(ValueError, match=r"dialogue 'cut' in \['test', 'train'\]"):
        build_splits(manifest, features, tmp_path / "s", {"seed": 1, "strategy": "manifest"})
    _with_columns(manifest, [None] * len(split), [None] * len(split))  # null dialogues: every row alone
    build_splits(manifest, features, tmp_path / "s", {"seed": 1, "strategy": "manifest"})


# --- context is informative above zero inertia (real rendered corpus, real transcripts) ----------------


def _probe_accuracies(x: np.ndarray, y: np.ndarray, sessions: np.ndarray, dialogue: np.ndarray, turn: np.ndarray) -> tuple[float, float]:
    """Leave-one-session-out (speaker independent) accuracy of an utterance-only probe and of a context probe.

    The context probe adds, per utterance, the mean over the previous turns of its dialogue of the
    utterance probe's class probabilities, cross-fitted so no row's own label leaks into them.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(a: np.ndarray, b: np.ndarray):
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(a, b)

    order = np.lexsort((turn, dialogue))  # rows by (dialogue, turn)
    utt, ctx = [], []
    for held in np.unique(sessions):
        test, train = sessions == held, sessions != held
        probs = np.zeros((len(y), len(np.unique(y))))  # (N, K)
        for inner in np.unique(sessions[train]):  # out-of-fold probabilities for the training rows
            probs[sessions == inner] = fit(x[train & (sessions != inner)], y[train & (sessions != inner)]).predict_proba(x[sessions == inner])
        model = fit(x[train], y[train])
        probs[test] = model.predict_proba(x[test])
        before = np.zeros_like(probs)  # (N, K) mean over the previous turns; zeros on a first turn
        for name in np.unique(dialogue):
            rows = order[dialogue[order] == name]
            running = np.cumsum(probs[rows], axis=0)
            before[rows[1:]] = running[:-1] / np.arange(1, len(rows))[:, None]
        utt.append(float((model.predict(x[test]) == y[test]).mean()))
        with_context = np.hstack([x, before])
        ctx.append(float((fit(with_context[train], y[train]).predict(with_context[test]) == y[test]).mean()))
    return float(np.mean(utt)), float(np.mean(ctx))


@pytest.mark.slow
def test_inertia_makes_context_informative(tmp_path: Path) -> None:
    """At inertia 0.9 a context-aware probe beats the utterance-only probe (measured gains .06-.08 over 3 seeds)."""
    from sklearn.feature_extraction.text import CountVectorizer

    listing = make_tiny_corpus(tmp_path, n=320, seed=33, profile="realistic", sessions=4, max_duration_s=2.0,
                               inertia=0.9, dialogue_turns=10)
    table = pq.read_table(listing).to_pandas()
    texts = [(tmp_path / p).read_text(encoding="utf-8") for p in table.text_path]
    x = CountVectorizer(binary=True).fit_transform(texts).toarray().astype(float)  # (N, vocabulary)
    utterance, context = _probe_accuracies(x, table.label.to_numpy(), table.session.to_numpy(),
                                           table.dialogue.to_numpy(), table.turn.to_numpy())
    print("probe accuracy: utterance", round(utterance, 3), "context", round(context, 3))
    assert context > utterance + 0.03, (utterance, context)
