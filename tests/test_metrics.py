"""Metrics against hand-derived small cases and against sklearn/scipy on random inputs."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, f1_score, recall_score
from sklearn.metrics import confusion_matrix as sk_confusion

from pipeline.core.metrics import (classification_metrics, confusion_matrix, pearson, regression_metrics,
                              selection_score)


def test_classification_hand_case():
    # true 0,0,0,1,1,2 / pred 0,0,1,1,2,2
    # confusion rows (true): [2,1,0], [0,1,1], [0,0,1]
    # WA = 4/6. Recalls 2/3, 1/2, 1 -> UA = (2/3 + 1/2 + 1)/3 = 13/18.
    # Precisions 2/2, 1/2, 1/2 -> F1 = 4/5, 1/2, 2/3; weighted by support 3,2,1:
    # (3*4/5 + 2*1/2 + 1*2/3)/6 = 61/90.
    y_true, y_pred = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(y_true, y_pred, 3)
    assert m["wa"] == pytest.approx(4 / 6)
    assert m["ua"] == pytest.approx(13 / 18)
    assert m["wf1"] == pytest.approx(61 / 90)
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, 3), [[2, 1, 0], [0, 1, 1], [0, 0, 1]])


def test_ua_ignores_classes_absent_from_truth_and_accepts_logits():
    # true 0,0,1,1 / pred 0,3,1,1 over 4 classes: recalls of present classes 1/2 and 1 -> UA = 3/4;
    # class 3 (never true) is not averaged in. WA = 3/4. F1: c0 = 2/3 (P=1, R=1/2), c1 = 1 -> (2*2/3+2*1)/4 = 5/6.
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 3, 1, 1]), 4)
    assert (m["wa"], m["ua"]) == (pytest.approx(0.75), pytest.approx(0.75))
    assert m["wf1"] == pytest.approx(5 / 6)
    logits = np.eye(4)[[0, 3, 1, 1]] * 5.0  # (4, 4) one-hot scores -> same argmax
    assert classification_metrics(np.array([0, 0, 1, 1]), logits, 4) == m


def test_regression_hand_case():
    y_true = np.array([2.0, -1.0, 0.0, 0.4, -2.6])
    y_score = np.array([1.5, 0.5, -0.3, 3.7, -2.4])
    m = regression_metrics(y_true, y_score)
    # non-zero labels: idx 0,1,3,4; truth +,-,+,- vs pred +,+,+,- -> 3 of 4 right.
    assert m["acc2"] == pytest.approx(3 / 4)
    # positive: TP 2, FP 1, FN 0 -> F1 4/5; negative: TP 1, FP 0, FN 1 -> 2/3; supports 2,2 -> 11/15
    assert m["f1"] == pytest.approx(11 / 15)
    # clip+round: truth 2,-1,0,0,-3 ; pred 2 (1.5 half-to-even), 0, -0, 3, -2 -> 2 of 5 equal
    assert m["acc7"] == pytest.approx(2 / 5)
    # |errors| 0.5, 1.5, 0.3, 3.3, 0.2 -> 5.8 / 5
    assert m["mae"] == pytest.approx(1.16)


def test_pearson_hand_case_and_constant_input():
    # x 1,2,3 ; y 2,4,7: dx -1,0,1 ; dy -7/3,-1/3,8/3 ; sum dx dy = 5 ; sum dx^2 = 2 ; sum dy^2 = 114/9
    # r = 5 / sqrt(2 * 114/9) = 15 / sqrt(228)
    assert pearson(np.array([1, 2, 3]), np.array([2, 4, 7])) == pytest.approx(15 / np.sqrt(228))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning spam for constant predictions
        assert pearson(np.zeros(5), np.arange(5.0)) == 0.0
        m = regression_metrics(np.array([1.0, -2.0, 0.5]), np.full(3, 0.7))
    assert m["corr"] == 0.0 and m["acc2"] == pytest.approx(2 / 3)


def test_regression_all_zero_labels_give_nan_acc2():
    m = regression_metrics(np.zeros(4), np.array([0.1, -0.2, 0.0, 1.0]))
    assert np.isnan(m["acc2"]) and np.isnan(m["f1"]) and m["acc7"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("seed", range(5))
def test_classification_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_classes = 5
    y_true = rng.integers(0, n_classes - 1, 60)  # class 4 never true
    y_pred = rng.integers(0, n_classes, 60)
    m = classification_metrics(y_true, y_pred, n_classes)
    assert m["wa"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["ua"] == pytest.approx(recall_score(y_true, y_pred, labels=np.unique(y_true), average="macro"))
    assert m["wf1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted", zero_division=0))
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, n_classes),
                                  sk_confusion(y_true, y_pred, labels=range(n_classes)))


@pytest.mark.parametrize("seed", range(5))
def test_regression_matches_sklearn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    y_true = np.round(rng.uniform(-3, 3, 80) * 3) / 3  # MOSI-like thirds, some exact zeros
    y_true[:5] = 0.0
    y_score = y_true + rng.normal(0, 1.0, 80)
    m = regression_metrics(y_true, y_score)
    nz = y_true != 0
    bt, bs = y_true[nz] > 0, y_score[nz] > 0
    assert m["acc2"] == pytest.approx(accuracy_score(bt, bs))
    assert m["f1"] == pytest.approx(f1_score(bt, bs, average="weighted"))
    assert m["mae"] == pytest.approx(np.mean(np.abs(y_true - y_score)))
    assert m["corr"] == pytest.approx(pearsonr(y_score, y_true)[0])
    assert m["acc7"] == pytest.approx(np.mean(np.round(np.clip(y_score, -3, 3)) == np.round(np.clip(y_true, -3, 3))))


def test_selection_score_and_errors():
    assert selection_score({"wa": 0.7, "ua": 0.6}, "classification") == 0.7
    assert selection_score({"acc2": 0.8, "mae": 0.9}, "regression") == 0.8
    assert selection_score({"acc2": 0.8, "mae": 0.9}, "regression", key="mae") == -0.9
    with pytest.raises(KeyError, match="f1"):
        selection_score({"wa": 0.7}, "classification", key="f1")
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(np.array([]), np.array([]), 3)
    with pytest.raises(ValueError, match="3 targets but 2"):
        regression_metrics(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="class ids"):
        classification_metrics(np.array([0, 5]), np.array([0, 1]), 3)
