"""Clustering around landscape states and energy-based particle voting, with the AlphaCryo4D
reference example's class sizes and voted particles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hetero.analysis.voting import (
    Memberships,
    assign_to_centers,
    default_radius,
    image_name_keys,
    majority_threshold,
    majority_vote,
    memberships_from_star_files,
    nearest_vote,
    star_file_keys,
)
from hetero.models.alphacryo4d.shuffling import leave_one_out, shuffle_unions

FAST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "alphacryo4d_fast"


@pytest.fixture(scope="module")
def fast():
    if not FAST.is_dir():
        pytest.skip(f"AlphaCryo4D fixtures not found at {FAST}")
    return FAST


def test_reference_clustering_class_sizes_and_members(fast):
    pts = np.load(fast / "output_big.npy")
    labels, dist = assign_to_centers(pts, np.load(fast / "centers_k.npy"), radius=30.0)
    assert np.bincount(labels[labels >= 0]).tolist() == [34, 30, 23, 16, 22, 29, 41]
    assert int(np.sum(labels < 0)) == 805
    for k in range(7):
        ref = np.loadtxt(fast / "vote" / f"c{k + 1}.txt", ndmin=2)
        order = np.argsort(ref[:, 0])
        np.testing.assert_array_equal(np.flatnonzero(labels == k) + 1, ref[order, 0].astype(int))
        np.testing.assert_allclose(dist[labels == k], ref[order, 1], rtol=1e-12)


def test_reference_voting_keeps_the_923_particles(fast):
    folder = fast / "vote" / "c1"
    small = np.loadtxt(folder / "c1_small.txt", ndmin=2)
    assert small[:, 0].tolist() == [1, 2, 3]
    files = [folder / f for f in ("u134_b1_c1.star", "u124_b1_c1.star", "u123_b1_c1.star")]
    members, keys = memberships_from_star_files(files)
    assert members.n_particles == 9258
    assert np.bincount(members.per_particle()).tolist() == [0, 8335, 902, 21]
    result = majority_vote(members, np.zeros(3, int), n_states=1)
    assert result.threshold == 2
    kept = set(keys[result.state(0)])
    expected = set(star_file_keys(folder / "post_and.star"))
    assert len(kept) == 923 and kept == expected


def test_image_name_keys_are_exact_identities(tmp_path):
    keys = image_name_keys(["1@a.mrcs", "000001@a.mrcs", "11@a.mrcs", "1@b.mrcs"])
    assert keys[0] == keys[1] and len(set(keys)) == 3  # substring matching would merge 1 and 11
    with pytest.raises(ValueError, match="row 1"):
        image_name_keys(["a.mrcs"], "x.star")
    # the same stack named relative to two different folders is the same stack
    (tmp_path / "Extract").mkdir()
    (tmp_path / "Extract" / "a.mrcs").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    one = image_name_keys(["3@Extract/a.mrcs"], bases=[tmp_path])
    two = image_name_keys(["3@../Extract/a.mrcs"], bases=[tmp_path / "sub"])
    assert one[0] == two[0] == f"3@{tmp_path / 'Extract' / 'a.mrcs'}"


@pytest.mark.parametrize("fold", [3, 4, 5])
def test_voting_never_assigns_a_particle_twice(fold):
    """Shuffled unions, each classified into K classes at random, scattered at random over
    four states: every particle has M votes and wins at most one state."""
    rng = np.random.default_rng(fold)
    n, k_classes, n_states = 600, 6, 4
    shuffle = leave_one_out(n, fold=fold, seed=1)
    lists = []
    for union in shuffle.unions:
        cls = rng.integers(0, k_classes, len(union))
        lists += [union[cls == c] for c in range(k_classes)]
    members = Memberships.from_lists(lists, n)
    assert np.all(members.per_particle() == fold)
    labels = rng.integers(-1, n_states, members.n_volumes)
    result = majority_vote(members, labels, n_states)
    assert result.threshold == majority_threshold(fold) == fold // 2 + 1
    votes = np.zeros((n, n_states), int)
    for v in range(members.n_volumes):
        if labels[v] >= 0:
            votes[members.volume(v), labels[v]] += 1
    winners = votes >= result.threshold
    assert winners.sum(1).max() <= 1
    expected = np.where(winners.any(1), winners.argmax(1), -1)
    np.testing.assert_array_equal(result.labels, expected)
    assert result.counts.sum() + result.n_discarded == n


def test_a_threshold_that_is_no_majority_is_refused():
    # M = 4: two votes for each of two states would both pass a threshold of M / 2
    members = Memberships.from_lists([[0, 1], [0], [0, 1], [0]], 2)
    with pytest.raises(ValueError, match="majority"):
        majority_vote(members, np.array([0, 0, 1, 1]), n_states=2, threshold=2)
    assert majority_vote(members, np.array([0, 0, 1, 1]), n_states=2).labels.tolist() == [-1, -1]


def test_bootstrap_memberships_vote_with_the_window_majority():
    shuffle = shuffle_unions(300, n_subsets=10, window=5, seed=0)
    members = Memberships.from_lists(shuffle.unions, 300)
    result = majority_vote(members, np.zeros(shuffle.n_unions, int), n_states=1)
    assert result.threshold == 3 and np.all(result.labels == 0)


def test_default_radius_is_the_median_nearest_centre_distance():
    centers = np.array([[0, 0], [1, 0], [3, 0]], float)
    assert default_radius(centers) == 1.0
    labels, _ = assign_to_centers(np.array([[0.4, 0], [2.2, 0], [9, 9]]), centers, None)
    assert labels.tolist() == [0, 2, 2]


def test_distance_based_alternative_takes_the_nearest_volume():
    members = Memberships.from_lists([[0, 1], [0, 2], [1, 2], [3]], 4)
    xy = np.array([[0.0, 0.0], [9.0, 0.0], [4.0, 0.0], [50.0, 0.0]])
    centers = np.array([[1.0, 0.0], [10.0, 0.0]])
    res = nearest_vote(members, xy, centers)
    # particle 0: volumes 0 and 1 are both 1 from a state: the lower state wins
    assert res.labels.tolist() == [0, 0, 1, 1]
    assert nearest_vote(members, xy, centers, max_distance=5.0).labels[3] == -1
