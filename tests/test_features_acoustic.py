"""openSMILE acoustic extractor on real synthetic wavs and the field's bad audio."""
from __future__ import annotations

import numpy as np
import pytest

from features.acoustic import AcousticExtractor
from features.base import ClipError
from tests.media_factory import bad_audio, write_wav


@pytest.fixture(scope="module")
def extractor() -> AcousticExtractor:
    return AcousticExtractor({"feature_set": "eGeMAPSv02", "segments": 8})


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    return bad_audio(tmp_path_factory.mktemp("bad_audio"))


def test_good_wav_gives_full_shapes_and_finite_values(tmp_path, extractor):
    feats = extractor.extract(write_wav(tmp_path / "a.wav", duration_s=1.2))
    t, d = extractor.seq_shape
    assert feats.sequence.shape == (t, d) == (8, 2 * 25)
    assert feats.summary.shape == (len(extractor.summary_names),) == (88,)
    assert feats.length == 8
    assert np.isfinite(feats.sequence).all() and np.isfinite(feats.summary).all()
    assert np.abs(feats.sequence).sum() > 0
    assert len(extractor.feature_names) == d


@pytest.mark.parametrize("name", ["stereo48k", "pcm_u8"])
def test_odd_but_valid_formats_are_decoded(odd_files, extractor, tmp_path, name):
    path, _ = odd_files[name]
    feats = extractor.extract(path)
    assert feats.length == 8 and np.isfinite(feats.sequence).all()
    # resampled and mixed 48 kHz stereo lands near the same features as the 16 kHz mono rendering
    if name == "stereo48k":
        ref = extractor.extract(write_wav(tmp_path / "ref.wav", rate=16000, seed=5))
        f0_col = 0  # F0semitoneFrom27.5Hz_sma3nz mean of the first segment
        assert abs(feats.sequence[:, f0_col].mean() - ref.sequence[:, f0_col].mean()) < 1.0


@pytest.mark.parametrize("name", ["zero", "truncated", "silent", "garbage", "short"])
def test_bad_audio_raises_clip_error_with_reason_and_file(odd_files, extractor, name):
    path, reason = odd_files[name]
    with pytest.raises(ClipError) as info:
        extractor.extract(path)
    assert info.value.reason == reason
    assert str(path) in str(info.value)


def test_short_signal_pools_into_fewer_segments(tmp_path):
    ext = AcousticExtractor({"segments": 64, "min_duration_s": 0.1})
    feats = ext.extract(write_wav(tmp_path / "s.wav", duration_s=0.3))
    assert 0 < feats.length < 64
    assert np.all(feats.sequence[feats.length :] == 0)


def test_compare_feature_set_is_configurable(tmp_path):
    ext = AcousticExtractor({"feature_set": "ComParE_2016", "segments": 4})
    assert ext.config_hash != AcousticExtractor({"segments": 4}).config_hash
    feats = ext.extract(write_wav(tmp_path / "c.wav"))
    assert feats.sequence.shape == ext.seq_shape and ext.seq_shape[1] > 100
