"""Acoustic features: openSMILE low-level descriptors pooled into time segments.

One entry point for every clip: decode (soundfile) -> mono mix -> resample to the
target rate -> validate -> openSMILE on the in-memory signal. Validating before
openSMILE matters: openSMILE happily returns numbers for a silent or truncated
file, and those numbers would look like a real (very calm) speaker.

- sequence: LLD frames (10 ms hop) pooled into `segments` contiguous segments,
  mean and std per segment -> (segments, 2 * n_lld); `length` = non-empty segments.
- summary: the feature set's functionals (88 for eGeMAPSv02) of the whole clip.
"""
from __future__ import annotations

import io
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from features.base import ClipError, ClipFeatures, Extractor, pool_segments

DEFAULTS: dict[str, Any] = {
    "feature_set": "eGeMAPSv02",
    "sample_rate": 16000,
    "segments": 16,
    "min_duration_s": 0.25,  # below this there are too few LLD frames to pool
    "silence_dbfs": -60.0,  # RMS below this (dB re full scale) counts as silent
}
STATS = ("mean", "std")


class AcousticExtractor(Extractor):
    modality = "acoustic"
    version = 2  # 2: silence judged without DC offset; zero-length WAV data chunks read
    defaults = DEFAULTS
    preload = ("features.acoustic", "opensmile", "soundfile", "scipy.signal")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._lld = None
        self._func = None

    def setup(self) -> None:
        import opensmile  # heavy import kept out of module import time

        feature_set = getattr(opensmile.FeatureSet, self.config["feature_set"], None)
        if feature_set is None:
            raise ValueError(f"unknown openSMILE feature_set {self.config['feature_set']!r}")
        self._lld = opensmile.Smile(feature_set=feature_set, feature_level=opensmile.FeatureLevel.LowLevelDescriptors)
        self._func = opensmile.Smile(feature_set=feature_set, feature_level=opensmile.FeatureLevel.Functionals)

    @property
    def seq_shape(self) -> tuple[int, int]:
        self.ensure_setup()
        return int(self.config["segments"]), len(self._lld.feature_names) * len(STATS)

    @property
    def feature_names(self) -> list[str]:
        self.ensure_setup()
        return [f"{name}_{stat}" for stat in STATS for name in self._lld.feature_names]

    @property
    def summary_names(self) -> list[str]:
        self.ensure_setup()
        return list(self._func.feature_names)

    def extract(self, path: Path) -> ClipFeatures:
        self.ensure_setup()
        rate = int(self.config["sample_rate"])
        signal = load_audio(Path(path), rate, float(self.config["min_duration_s"]), float(self.config["silence_dbfs"]))
        lld = self._lld.process_signal(signal, rate).to_numpy(dtype=np.float32)  # (frames, n_lld)
        func = self._func.process_signal(signal, rate).to_numpy(dtype=np.float32)[0]  # (n_func,)
        if not (np.isfinite(lld).all() and np.isfinite(func).all()):
            raise ClipError("unreadable_audio", path, "openSMILE returned non-finite values")
        seq, length = pool_segments(lld, int(self.config["segments"]), STATS)
        return ClipFeatures(sequence=seq, length=length, summary=func)


def load_audio(path: Path, rate: int, min_duration_s: float, silence_dbfs: float) -> np.ndarray:
    """Decode, mono-mix and resample one file to float32 at `rate`, or raise ClipError."""
    size = path.stat().st_size
    if size == 0:
        raise ClipError("unreadable_audio", path, "zero-byte file")
    source: str | io.BytesIO = str(path)
    patch = _check_wav_header(path)
    if patch is not None:  # streaming writer: data length left at 0, samples follow
        blob = bytearray(path.read_bytes())
        field_at, available = patch
        struct.pack_into("<I", blob, 4, len(blob) - 8)  # RIFF size, often left at 0 too
        struct.pack_into("<I", blob, field_at, available)
        source = io.BytesIO(bytes(blob))
    try:
        data, file_rate = sf.read(source, dtype="float32", always_2d=True)  # (n, channels)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise ClipError("unreadable_audio", path, f"cannot decode ({exc})") from exc
    if data.size == 0:
        raise ClipError("truncated_audio", path, "no audio samples")
    if not np.isfinite(data).all():
        raise ClipError("unreadable_audio", path, "non-finite samples")
    mono = data.mean(axis=1)  # (n,)
    if file_rate != rate:
        g = math.gcd(int(file_rate), rate)
        mono = resample_poly(mono, rate // g, int(file_rate) // g).astype(np.float32)
    duration = len(mono) / rate
    if duration < min_duration_s:
        raise ClipError("too_short_audio", path, f"{duration:.3f} s < {min_duration_s} s")
    # Silence is judged on the signal without its DC offset: a constant level is not sound.
    centred = mono.astype(np.float64) - float(np.mean(mono, dtype=np.float64))
    rms = float(np.sqrt(np.mean(np.square(centred))))
    dbfs = 20 * math.log10(rms) if rms > 0 else -math.inf
    if dbfs < silence_dbfs:
        raise ClipError("silent_audio", path, f"RMS without DC offset {dbfs:.1f} dBFS < {silence_dbfs} dBFS")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_wav_header(path: Path) -> tuple[int, int] | None:
    """Check a RIFF/WAVE header against the file; None, or where to patch a zero data length.

    - A data chunk declaring more bytes than the file holds was cut short: libsndfile
      silently reads what is there, so truncation must be checked on the header.
    - A data chunk declaring 0 bytes with bytes after it comes from a streaming writer
      that never went back to fill in the length: returns (offset of the length field,
      whole sample frames that follow, in bytes) so the caller can read them.
    """
    with path.open("rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None  # not a RIFF/WAVE file: leave it to the decoder
        size = path.stat().st_size
        pos, block_align = 12, 1
        while pos + 8 <= size:
            fh.seek(pos)
            chunk_id, chunk_len = struct.unpack("<4sI", fh.read(8))
            if chunk_id == b"fmt " and chunk_len >= 14:
                block_align = max(1, struct.unpack("<H", fh.read(14)[12:14])[0])
            if chunk_id == b"data":
                available = size - pos - 8
                if chunk_len == 0 and available >= block_align:
                    return pos + 4, available - available % block_align
                if chunk_len != 0xFFFFFFFF and chunk_len > available:
                    raise ClipError("truncated_audio", path, f"data chunk declares {chunk_len} bytes, file holds {available}")
                return None
            pos += 8 + chunk_len + (chunk_len & 1)
        raise ClipError("truncated_audio", path, "RIFF/WAVE file without a data chunk")
