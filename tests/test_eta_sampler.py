"""MPLMM's samplers: eta dropout (stage 2) and naturally complete rows (stage 1)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.modalities import COMBINATIONS, mask_to_index
from pipeline.training.eta_sampler import CompleteRowsSampler, EtaDropoutSampler
from pipeline.training.samplers import SAMPLERS


def test_registered_for_training_plans():
    assert SAMPLERS["eta"] is EtaDropoutSampler and SAMPLERS["complete"] is CompleteRowsSampler


def test_eta_sampler_drops_proper_subsets_at_the_promised_rate():
    natural = np.ones((4000, 3), dtype=bool)
    natural[:500, 2] = False  # some "at" rows
    natural[500:600] = [False, True, False]  # text only: nothing to drop
    for eta in (0.3, 0.7):
        sampler = EtaDropoutSampler(natural, 64, seed=1, eta=eta)
        keys = list(iter(sampler))
        index = np.concatenate([k.index for k in keys])
        masks = np.concatenate([k.mask for k in keys])
        assert sorted(index) == list(range(4000))
        nat = natural[index]
        assert not (masks & ~nat).any() and masks.any(axis=1).all()  # subsets, never empty
        complete = nat.all(axis=1)
        assert abs(1 - masks[complete].mean() - 0.5 * eta) < 0.03  # a complete row loses 1.5 eta of 3
        assert (masks[(nat == [False, True, False]).all(axis=1)] == [False, True, False]).all()
        assert sum(sampler.last_counts.values()) == 4000
    again = EtaDropoutSampler(natural, 64, seed=1, eta=0.7)
    assert all((a.mask == b.mask).all() and (a.index == b.index).all()
               for a, b in zip(again.draw_epoch(3), EtaDropoutSampler(natural, 64, 1, eta=0.7).draw_epoch(3)))


def test_eta_sampler_respects_formable_combinations_and_complete_rows():
    natural = np.ones((300, 3), dtype=bool)
    natural[:100, 0] = False
    allowed = np.array([c in ("t", "v", "tv") for c in COMBINATIONS])  # a dataset without audio
    masks = np.concatenate([k.mask for k in EtaDropoutSampler(natural, 32, 0, allowed=allowed).draw_epoch(0)])
    assert allowed[mask_to_index(masks)].all()
    complete = CompleteRowsSampler(natural, 32, 0)
    keys = complete.draw_epoch(0)
    assert sorted(np.concatenate([k.index for k in keys])) == list(range(100, 300))
    assert all(k.mask.all() for k in keys)
    only_tv = CompleteRowsSampler(natural, 32, 0, allowed=allowed)  # complete = every formable modality
    assert len(np.concatenate([k.index for k in only_tv.draw_epoch(0)])) == 300
    with pytest.raises(ValueError, match="stage1_sampler"):
        CompleteRowsSampler(natural[:100], 32, 0)
