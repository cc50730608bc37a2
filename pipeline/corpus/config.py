"""The corpus configuration: every knob of `params.yaml: corpus`, typed and checked."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.corpus.profiles import DEFAULT_PROFILE, KNOBS, PROFILES, overrides_of, resolve_knobs


@dataclass(frozen=True)
class CorpusConfig:
    seed: int = 20261123
    out_dir: str = "data/corpus"  # resolved by the stage; generate_corpus takes out_dir explicitly
    classes: tuple[str, ...] = ("neutral", "happy", "sad", "angry")
    sessions: int = 5
    speakers_per_session: int = 2
    utterances: int = 1200
    sample_rate: int = 16000
    min_duration_s: float = 1.5
    max_duration_s: float = 4.0
    video_size: int = 128
    video_fps: int = 12
    video_format: str = "mp4"  # "mp4" (OpenCV mp4v) or "avi" (MJPG)
    breakage_share: float = 0.06
    shifted_domain: bool = False  # also render a shifted domain (new speakers, noisier channel)
    shifted_sessions: int = 2
    shifted_utterances: int = 300
    workers: int = 0  # 0 = all cores
    # conversations (pipeline/corpus/dialogues.py): a session's utterances come as two-speaker dialogues
    dialogue_turns: float = 12.0  # mean utterances per dialogue (1 = every utterance alone)
    inertia: float = 0.0  # chance an utterance repeats the emotion of its own or the partner's last turn; 0 = independent
    # informativeness: how much each modality alone can know. None = the profile's value
    # (pipeline/corpus/profiles.py); __post_init__ fills them, so a built config is concrete.
    profile: str = DEFAULT_PROFILE
    audio_emotion_strength: float | None = None
    audio_intensity_range: tuple[float, float] | None = None
    audio_variability: float | None = None
    snr_db_range: tuple[float, float] | None = None
    face_intensity_range: tuple[float, float] | None = None
    face_jitter: float | None = None
    video_noise_std: float | None = None
    text_cue_share: float | None = None
    text_misleading_share: float | None = None
    # the shifted domain's channel
    shifted_snr_db_range: tuple[float, float] = (0.0, 12.0)
    shifted_video_noise_std: float = 14.0
    shifted_light_gain: float = 0.65

    def __post_init__(self) -> None:
        for knob, value in resolve_knobs(self.profile, {k: getattr(self, k) for k in KNOBS}).items():
            object.__setattr__(self, knob, value)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "CorpusConfig":
        """Build from a params section; unknown keys are an error naming the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise KeyError(f"params.yaml corpus: unknown keys {unknown}")
        values = dict(params)
        for key in ("classes", "audio_intensity_range", "snr_db_range", "face_intensity_range", "shifted_snr_db_range"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"corpus.classes must be >= 2 distinct names, got {list(self.classes)}")
        if not 0 < self.min_duration_s <= self.max_duration_s:
            raise ValueError("corpus: need 0 < min_duration_s <= max_duration_s")
        if not 0 <= self.breakage_share <= 1:
            raise ValueError(f"corpus.breakage_share must be in [0, 1], got {self.breakage_share}")
        if self.text_cue_share < 0 or self.text_misleading_share < 0 or self.text_cue_share + self.text_misleading_share > 1:
            raise ValueError("corpus: text_cue_share + text_misleading_share must lie in [0, 1]")
        if self.profile not in PROFILES:
            raise ValueError(f"corpus.profile must be one of {sorted(PROFILES)}, got {self.profile!r}")
        if self.video_format not in ("mp4", "avi"):
            raise ValueError(f"corpus.video_format must be 'mp4' or 'avi', got {self.video_format!r}")
        if not self.dialogue_turns >= 1:
            raise ValueError(f"corpus.dialogue_turns (mean utterances per dialogue) must be >= 1, got {self.dialogue_turns}")
        if not 0 <= self.inertia <= 1:
            raise ValueError(f"corpus.inertia must be in [0, 1], got {self.inertia}")
        if self.utterances < 1 or self.sessions < 1 or self.speakers_per_session < 1:
            raise ValueError("corpus: utterances, sessions and speakers_per_session must be >= 1")

    def overrides(self) -> dict[str, Any]:
        """Informativeness knobs set away from the profile's values."""
        return overrides_of(self.profile, {k: getattr(self, k) for k in KNOBS})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
