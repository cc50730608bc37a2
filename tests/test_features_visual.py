"""Haar-cascade face descriptors on drawn-face videos and the field's bad video."""
from __future__ import annotations

import numpy as np
import pytest

from features.base import ClipError
from features.visual import VisualExtractor, lbp_histograms
from tests.media_factory import bad_video, write_face_video


@pytest.fixture(scope="module")
def extractor() -> VisualExtractor:
    return VisualExtractor({"segments": 8, "max_frames": 12})


def test_face_video_gives_full_shapes_and_face_rate(tmp_path, extractor):
    feats = extractor.extract(write_face_video(tmp_path / "f.mp4", n_frames=20))
    t, d = extractor.seq_shape
    assert feats.sequence.shape == (t, d) and len(extractor.feature_names) == d
    assert feats.summary.shape == (len(extractor.summary_names),)
    assert feats.length == 8
    assert np.isfinite(feats.sequence).all() and np.isfinite(feats.summary).all()
    assert feats.extras["frames"] == 12  # sampled evenly, capped at max_frames
    assert feats.extras["face_rate"] > 0.8
    assert feats.summary[-1] == pytest.approx(feats.extras["face_rate"])
    assert d < 600  # fixed descriptor of moderate size


def test_few_frames_give_short_length(tmp_path, extractor):
    feats = extractor.extract(write_face_video(tmp_path / "short.mp4", n_frames=3))
    assert feats.length == 3
    assert np.all(feats.sequence[3:] == 0)


@pytest.mark.parametrize("name", ["no_frames", "garbage", "zero", "black", "no_face"])
def test_bad_video_raises_clip_error_with_reason(tmp_path_factory, extractor, name):
    files = bad_video(tmp_path_factory.mktemp("bad_video"))
    path, reason = files[name]
    with pytest.raises(ClipError) as info:
        extractor.extract(path)
    assert info.value.reason == reason
    assert str(path) in str(info.value)


def test_lbp_histograms_are_normalised_per_cell():
    crop = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    hist = lbp_histograms(crop, grid=2)
    assert hist.shape == (4 * 59,)
    np.testing.assert_allclose(hist.reshape(4, 59).sum(axis=1), 1.0, rtol=1e-6)
    flat = lbp_histograms(np.full((16, 16), 7, np.uint8), grid=1)
    assert flat[np.argmax(flat)] == 1.0  # a flat patch is a single (uniform) pattern


def test_crop_must_fit_hog_cells():
    with pytest.raises(ValueError, match="multiple of hog_cell"):
        VisualExtractor({"crop_size": 60, "hog_cell": 16})
