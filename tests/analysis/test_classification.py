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


def test_matched_precision_recall_hand_computed():
    from hetero.analysis.classification import matched_precision_recall

    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    labels = np.array([5, 5, 5, 1, 1, 1, 1, -1, 1, 7])
    s = matched_precision_recall(truth, labels)
    # Hungarian: state 0 -> class 5 (3), state 1 -> class 1 (3), state 2 -> class 7 (1)
    assert s["matching"] == [5, 1, 7]
    assert s["precision"] == pytest.approx([1.0, 3 / 5, 1.0])
    assert s["recall"] == pytest.approx([3 / 4, 3 / 4, 1 / 2])  # the discarded particle is a miss
    assert s["precision_macro"] == pytest.approx((1 + 0.6 + 1) / 3)
    assert s["recall_macro"] == pytest.approx(2 / 3)
    assert s["discard_fraction"] == pytest.approx(0.1)


def test_matched_split_state_counts_once_and_unmatched_state_scores_zero():
    from hetero.analysis.classification import matched_precision_recall

    # state 0 split over classes 0 and 1, state 1 in class 2: one-to-one, state 0 gets half
    s = matched_precision_recall(np.array([0, 0, 0, 0, 1, 1]), np.array([0, 0, 1, 1, 2, 2]))
    assert s["recall"] == pytest.approx([0.5, 1.0]) and s["precision"] == pytest.approx([1.0, 1.0])
    # three states, two classes: the smallest state is left unmatched (precision = recall = 0)
    s = matched_precision_recall(np.array([0, 0, 0, 1, 1, 1, 2]), np.array([0, 0, 0, 1, 1, 1, 1]))
    assert s["matching"] == [0, 1, -1]
    assert s["precision"] == pytest.approx([1.0, 0.75, 0.0]) and s["recall"] == pytest.approx([1, 1, 0])
