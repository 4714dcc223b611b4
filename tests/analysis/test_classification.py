"""Precision, recall, discard rate and ARI of the kept particles."""

from __future__ import annotations

import numpy as np
import pytest

from hetero.analysis.classification import classification_scores


def test_perfect_and_discarding():
    truth = np.repeat([0, 1, 2], 10)
    s = classification_scores(truth, truth)
    assert s["precision_mean"] == s["recall_mean"] == s["ari_kept"] == 1.0 and s["discard_rate"] == 0
    labels = truth.copy()
    labels[::2] = -1  # discarding half keeps precision, halves recall
    s = classification_scores(truth, labels)
    assert s["precision_mean"] == 1.0 and s["discard_rate"] == 0.5
    assert s["recall_mean"] == pytest.approx(0.5)
    assert s["ari_kept"] == 1.0


def test_hand_computed_example():
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    labels = np.array([5, 5, 5, 1, 1, 1, 1, -1, 1, 7])
    s = classification_scores(truth, labels)
    # class 5: 3 of state 0 (precision 1); class 1: {0, 1, 1, 1, 2} -> state 1, 3/5; class 7: state 2
    assert sorted(s["precision"]) == [0.6, 1.0, 1.0]
    assert s["precision_weighted"] == pytest.approx(7 / 9)
    # state 0: 3 of 4 in class 5; state 1: 3 of 4 in class 1; state 2: 1 of 2 in class 7
    assert s["recall"] == pytest.approx([0.75, 0.75, 0.5])
    assert s["states_found"] == 3 and s["discard_rate"] == pytest.approx(0.1)


def test_two_classes_of_one_state_share_its_recall():
    truth = np.array([0, 0, 0, 0, 1, 1])
    s = classification_scores(truth, np.array([0, 0, 1, 1, 2, 2]))
    assert s["recall"] == [1.0, 1.0] and s["states_found"] == 2 and s["n_classes"] == 3
