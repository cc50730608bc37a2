"""Generate the corpus: plan every clip up front, render clips in parallel, write the listing last.

Determinism: the plan comes from one RNG seeded by `seed`; each clip renders from
its own RNGs derived from (seed, domain, index), so the worker count and order
never change a byte. Dialogues (`dialogues.py`) only arrange the planned clips into
conversations from their own RNG stream; with `inertia` 0 every clip is as planned.
Streaming: a worker writes its clip's files and returns only a small row; media never
travel between processes. A killed run leaves no listing
(the old one is removed first, the new one written last and atomically).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from tqdm import tqdm

from pipeline.core.atomic import atomic_path, write_json
from pipeline.corpus import audio, breakage, dialogues, text, video
from pipeline.corpus.config import CorpusConfig
from pipeline.corpus.speakers import Speaker, make_speakers
from pipeline.formats.manifest import META_KEY, manifest_meta

GENERATOR_VERSION = "2"  # 2: dialogue and turn columns (clips unchanged at inertia 0)
LISTING_NAME = "listing.parquet"
DOMAIN_STREAM = {"source": 0, "shifted": 1}

LISTING_SCHEMA = pa.schema(
    [
        ("utterance_id", pa.string()),
        ("session", pa.string()),
        ("speaker", pa.string()),
        ("dialogue", pa.string()),
        ("turn", pa.int64()),
        ("label", pa.string()),
        ("domain", pa.string()),
        ("audio_path", pa.string()),
        ("video_path", pa.string()),
        ("text_path", pa.string()),
        ("gt_broken_modality", pa.string()),
        ("gt_breakage", pa.string()),
        ("gt_breakage_detail", pa.string()),
        ("gt_duration_s", pa.float64()),
        ("gt_audio_intensity", pa.float64()),
        ("gt_snr_db", pa.float64()),
        ("gt_face_intensity", pa.float64()),
        ("gt_light_gain", pa.float64()),
        ("gt_text_kind", pa.string()),
    ]
)


def generate_corpus(config: CorpusConfig | dict, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Render the whole corpus under `out_dir`; return a JSON-able summary (also in corpus.json)."""
    cfg = config if isinstance(config, CorpusConfig) else CorpusConfig.from_dict(config)
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    listing_path = out_dir / LISTING_NAME
    if listing_path.exists():
        listing_path.unlink()  # never let an old listing point at files being rewritten
    for sub in ("audio", "video", "text"):
        (out_dir / sub).mkdir(exist_ok=True)

    jobs = plan_corpus(cfg)
    started = time.perf_counter()
    workers = cfg.workers or os.cpu_count() or 1
    cfg_dict = cfg.to_dict()
    tasks = [(cfg_dict, str(out_dir), job) for job in jobs]
    bar = tqdm(total=len(tasks), desc="corpus", unit="clip", disable=not progress)
    rows: list[dict[str, Any]] = []
    if workers == 1:
        for task in tasks:
            rows.append(render_utterance(task))
            bar.update()
    else:
        with mp.get_context("spawn").Pool(min(workers, len(tasks)), initializer=_init_worker) as pool:
            for row in pool.imap(render_utterance, tasks, chunksize=4):
                rows.append(row)
                bar.update()
    bar.close()
    elapsed = time.perf_counter() - started

    table = pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)
    meta = manifest_meta("classification", list(cfg.classes), "imer-corpus", {"seed": cfg.seed})
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    summary = {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        # workers changes no byte of the output, so it stays out of the recorded config
        "config": {k: v for k, v in cfg_dict.items() if k != "workers"},
        # the informativeness knobs set on top of the profile (the rest are the profile's values)
        "profile_overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.overrides().items()},
        "counts": _counts(rows),
        "listing": LISTING_NAME,
    }
    write_json(out_dir / "corpus.json", summary)
    with atomic_path(listing_path) as tmp:
        pq.write_table(table, tmp)
    return {**summary, "out_dir": str(out_dir), "elapsed_s": round(elapsed, 2), "workers": workers}


def plan_corpus(cfg: CorpusConfig) -> list[dict[str, Any]]:
    """Who says what, how long, and which clip breaks: cheap, sequential, fully seeded."""
    jobs: list[dict[str, Any]] = []
    parts = [("source", cfg.sessions, cfg.utterances)]
    if cfg.shifted_domain:
        parts.append(("shifted", cfg.shifted_sessions, cfg.shifted_utterances))
    for domain, sessions, n_utts in parts:
        start = len(jobs)
        rng = np.random.default_rng([cfg.seed, 1009, DOMAIN_STREAM[domain]])
        speakers = make_speakers(cfg.seed, sessions, cfg.speakers_per_session, domain)
        per_speaker = np.full(len(speakers), n_utts // len(speakers))
        per_speaker[: n_utts % len(speakers)] += 1
        speaker_of = np.repeat(np.arange(len(speakers)), per_speaker)
        labels: list[str] = []
        offset = 0
        for count in per_speaker:  # every speaker acts every class about equally often, and so does the domain
            cycle = (np.arange(count) + offset) % len(cfg.classes)
            offset += count
            labels.extend(cfg.classes[int(c)] for c in rng.permutation(cycle))
        fps = cfg.video_fps
        frames = rng.integers(int(np.ceil(cfg.min_duration_s * fps)), int(np.floor(cfg.max_duration_s * fps)) + 1, n_utts)
        broken = breakage.assign_breakages(rng, n_utts, cfg.breakage_share)
        counters: Counter[str] = Counter()
        for i in range(n_utts):
            sp = speakers[speaker_of[i]]
            counters[sp.speaker_id] += 1
            jobs.append(
                {
                    "index": i,
                    "domain": domain,
                    "utterance_id": f"{sp.speaker_id}_{counters[sp.speaker_id]:04d}",
                    "speaker": sp.to_dict(),
                    "label": labels[i],
                    "n_frames": int(frames[i]),
                    "breakage": broken[i],
                }
            )
        # conversations over the planned clips: own RNG stream, labels change only when inertia > 0
        dialogues.arrange_dialogues(jobs[start:], cfg.seed, DOMAIN_STREAM[domain], cfg.dialogue_turns, cfg.inertia)
    return jobs


def render_utterance(task: tuple[dict[str, Any], str, dict[str, Any]]) -> dict[str, Any]:
    """Render one clip's three files (breaking one if planned); return its listing row."""
    cfg_dict, out_dir_s, job = task
    cfg = CorpusConfig.from_dict(cfg_dict)
    out_dir = Path(out_dir_s)
    sp = Speaker(**{**job["speaker"], "skin_bgr": tuple(job["speaker"]["skin_bgr"]),
                    "hair_bgr": tuple(job["speaker"]["hair_bgr"]), "background_bgr": tuple(job["speaker"]["background_bgr"])})
    seq = np.random.SeedSequence([cfg.seed, 2003, DOMAIN_STREAM[job["domain"]], job["index"]])
    r_audio, r_video, r_text, r_break = (np.random.default_rng(s) for s in seq.spawn(4))
    shifted = job["domain"] == "shifted"
    uid, label, code = job["utterance_id"], job["label"], job["breakage"]
    n_frames = job["n_frames"]
    duration = n_frames / cfg.video_fps
    n_samples = int(round(duration * cfg.sample_rate))
    detail: str | None = None

    # audio
    a_int = float(r_audio.uniform(*cfg.audio_intensity_range))
    prosody = audio.prosody_for(label, cfg.audio_emotion_strength * a_int, r_audio, cfg.audio_variability)
    snr = float(r_audio.uniform(*(cfg.shifted_snr_db_range if shifted else cfg.snr_db_range)))
    a_channel = audio.AudioChannel(snr_db=snr, noise_colour=float(r_audio.uniform(0, 1)),
                                   gain_db=float(r_audio.normal(0, 2)), band_limit=shifted)
    samples = audio.synthesize(r_audio, sp, prosody, n_samples, cfg.sample_rate, a_channel)
    audio_rel = f"audio/{uid}.wav"
    audio_path = out_dir / audio_rel
    if code == "audio_corrupt":
        detail = breakage.write_garbage(audio_path, r_break, n_samples * 2 + 44)
    else:
        if code == "audio_silent":
            samples, detail = breakage.silent_samples(r_break, n_samples)
        with atomic_path(audio_path) as tmp:
            sf.write(tmp, samples, cfg.sample_rate, subtype="PCM_16", format="WAV")
            if code == "audio_truncated":
                detail = breakage.truncate_wav(tmp, r_break)

    # video
    f_int = float(r_video.uniform(*cfg.face_intensity_range))
    expr = video.expression_for(label, f_int, r_video, cfg.face_jitter)
    gain = float(r_video.uniform(0.85, 1.15)) * (cfg.shifted_light_gain if shifted else 1.0)
    tint = (0.8, 0.95, 1.2) if shifted else (1.0, 1.0, 1.0)
    v_channel = video.Channel(
        light_gain=gain, light_side=float(r_video.uniform(-1, 1)), light_drift=float(r_video.uniform(-0.2, 0.2)),
        tint_bgr=tuple(float(t * r_video.normal(1, 0.03)) for t in tint),
        noise_std=cfg.shifted_video_noise_std if shifted else cfg.video_noise_std,
    )
    video_rel: str | None = f"video/{uid}.{cfg.video_format}"
    video_path = out_dir / video_rel
    if code == "video_absent":
        breakage.remove_if_present(video_path)
        video_rel = None
    else:
        syllable_rate = sp.rate_sps * prosody["rate"]
        frames = video.render_clip(r_video, sp, expr, n_frames, cfg.video_fps, cfg.video_size, v_channel, syllable_rate)
        if code == "video_black":
            frames = np.zeros_like(frames)
        video.write_video(video_path, frames, cfg.video_fps)

    # text
    sentence, kind = text.sentence_for(label, cfg.classes, r_text, cfg.text_cue_share, cfg.text_misleading_share)
    if code == "text_empty":
        sentence, detail = breakage.empty_transcript(r_break)
    text_rel = f"text/{uid}.txt"
    with atomic_path(out_dir / text_rel) as tmp:
        tmp.write_bytes(sentence.encode("utf-8"))

    return {
        "utterance_id": uid,
        "session": sp.session,
        "speaker": sp.speaker_id,
        "dialogue": job["dialogue"],
        "turn": job["turn"],
        "label": label,
        "domain": job["domain"],
        "audio_path": audio_rel,
        "video_path": video_rel,
        "text_path": text_rel,
        "gt_broken_modality": breakage.BREAKAGES[code] if code else None,
        "gt_breakage": code,
        "gt_breakage_detail": detail,
        "gt_duration_s": duration,
        "gt_audio_intensity": a_int,
        "gt_snr_db": snr,
        "gt_face_intensity": f_int,
        "gt_light_gain": gain,
        "gt_text_kind": kind,
    }


def _init_worker() -> None:
    # one process per core already; OpenCV's own thread pool would only oversubscribe
    import cv2

    cv2.setNumThreads(1)


def _counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def tally(key: str) -> dict[str, int]:
        return dict(sorted(Counter(str(r[key]) for r in rows).items()))

    return {
        "utterances": len(rows),
        "by_label": tally("label"),
        "by_speaker": tally("speaker"),
        "by_domain": tally("domain"),
        "by_breakage": dict(sorted(Counter(r["gt_breakage"] for r in rows if r["gt_breakage"]).items())),
        "total_duration_s": round(sum(r["gt_duration_s"] for r in rows), 2),
        **dialogues.dialogue_counts(rows),
    }
