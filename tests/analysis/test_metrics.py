"""Self-checks of the ground-truth metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetero.analysis import metrics as M


def test_identical_maps_fsc_one_and_auc_ceiling():
    d = 32
    vol = torch.randn(d, d, d, generator=torch.Generator().manual_seed(0))
    row = M.fsc_summary(vol, vol.clone(), apix=2.0)
    assert np.allclose(row["curve"], 1.0, atol=1e-5)
    assert row["auc"] == pytest.approx((d / 2 - 1) / d, abs=1e-6)
    assert row["res_0.5"] == pytest.approx(2 * 2.0)  # never crosses: Nyquist
    assert row["res_0.143"] == pytest.approx(2 * 2.0)


def test_unrelated_maps_low_auc():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 24, 24, 24, generator=g)
    row = M.fsc_summary(a, b, apix=1.0)
    assert row["auc"] < 0.1


def test_fsc_shape_mismatch():
    with pytest.raises(ValueError, match="differ"):
        M.fsc_summary(torch.zeros(8, 8, 8), torch.zeros(16, 16, 16), 1.0)


def test_ari_perfect_relabelling_and_random():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, 2000)
    perm = np.array([3, 0, 4, 1, 2])
    assert M.ari_ami(true, perm[true]) == pytest.approx({"ari": 1.0, "ami": 1.0})
    rand = M.ari_ami(true, rng.integers(0, 5, 2000))
    assert abs(rand["ari"]) < 0.02 and abs(rand["ami"]) < 0.02


def test_clustering_scores_separated_clusters():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    z = rng.normal(size=(4, 3))[labels] * 10 + rng.normal(scale=0.1, size=(200, 3))
    scores = M.clustering_scores(z, labels, seed=0)
    assert scores["k"] == 4 and scores["ari"] == pytest.approx(1.0)


def test_neighbourhood_similarity():
    rng = np.random.default_rng(0)
    t = rng.uniform(size=500)
    assert M.neighbourhood_similarity(t[:, None], t, k=10) == pytest.approx(1.0)
    # A monotone rescaling keeps the neighbourhoods; an unrelated embedding gives ~k/N.
    assert M.neighbourhood_similarity(np.stack([3 * t, np.zeros_like(t)], 1), t, k=10) == pytest.approx(1.0)
    unrelated = M.neighbourhood_similarity(rng.normal(size=(500, 2)), t, k=10)
    assert unrelated < 0.1
    with pytest.raises(ValueError):
        M.neighbourhood_similarity(t[:, None], t, k=500)


def test_state_representatives_and_sample():
    z = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    labels = np.array([0, 0, 0, 1, 1])
    assert M.state_representatives(z, labels) == {0: 1, 1: 3}  # mean 10.5 -> first of the tie
    np.testing.assert_array_equal(M.per_image_sample(1000, 100), np.arange(0, 1000, 10))
    assert len(M.per_image_sample(50, 200)) == 50


def test_batched_aucs_match_single():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 16, 16, 16, generator=g)
    b = a + 0.5 * torch.randn(3, 16, 16, 16, generator=g)
    batched = M.fsc_aucs(a, b)
    assert batched == pytest.approx([M.fsc_summary(a[i], b[i], 1.0)["auc"] for i in range(3)])
