"""Exact AUC against a brute-force pairwise count, log loss and calibration by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from train.metrics import auc, average_ranks, calibration, log_loss, reliability_curve


def brute_auc(y, s) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 700
    y = (rng.random(n) < 0.3).astype(int)
    s = rng.integers(0, 12, n) + 0.5 * y * rng.integers(0, 3, n)  # many ties, some signal
    assert auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    assert auc(y, -s) == pytest.approx(1 - brute_auc(y, s), abs=1e-12)


def test_auc_edges():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert math.isnan(auc([1, 1], [0.2, 0.3]))
    # global, not averaged over batches: two batches each perfectly ranked, globally not
    y, s = np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.8, 0.9])
    assert auc(y[:2], s[:2]) == auc(y[2:], s[2:]) == 1.0
    assert auc(y, s) == pytest.approx(brute_auc(y, s)) == 0.75


def test_average_ranks():
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])


def test_log_loss_and_calibration_by_hand():
    y = np.array([1, 0, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.4, 0.6, 0.1])
    hand = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert log_loss(y, p) == pytest.approx(hand)
    c = calibration(y, p, bins=2)
    assert c["mean_pred"] == pytest.approx(0.44) and c["observed"] == pytest.approx(0.4)
    assert c["ratio"] == pytest.approx(1.1)
    curve = reliability_curve(y, p, bins=2)  # equal-count bins by prediction: [.1 .2 .4] [.6 .9]
    assert [b["n"] for b in curve] == [3, 2]
    assert curve[0]["pred"] == pytest.approx(0.7 / 3) and curve[0]["observed"] == 0.0
    assert curve[1]["pred"] == pytest.approx(0.75) and curve[1]["observed"] == 1.0
    assert sum(b["n"] for b in reliability_curve(y, p, bins=10)) == 5
