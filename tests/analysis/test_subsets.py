"""Particle subsets: index files, and RELION star files that round-trip through read_star."""

from __future__ import annotations

import numpy as np
import pytest

from hetero.analysis.subsets import cluster_subsets, write_subset


def test_cluster_subsets_selection():
    labels = np.array([0, 1, 2, 1, 0, 2, 2])
    subs = cluster_subsets(labels)
    assert list(subs) == ["cluster_000", "cluster_001", "cluster_002"]
    np.testing.assert_array_equal(subs["cluster_002"], [2, 5, 6])
    merged = cluster_subsets(labels, [1, [0, 2]])
    assert list(merged) == ["cluster_001", "clusters_000_002"]
    np.testing.assert_array_equal(merged["clusters_000_002"], [0, 2, 4, 5, 6])
    with pytest.raises(ValueError, match="out of range"):
        cluster_subsets(labels, [3])


def test_star_subset_round_trip(tmp_path, conformance_dir):
    star = pytest.importorskip("hetero.data.io.star")
    table = star.read_star(conformance_dir / "relion31.star", datadir=conformance_dir)
    idx = np.array([len(table) - 1, 0, 2]) if len(table) > 2 else np.arange(len(table))
    files = write_subset(tmp_path, "cluster_000", table, idx)
    np.testing.assert_array_equal(np.load(files["npy"]), idx)
    assert files["txt"].read_text().split() == [str(i) for i in idx]
    back = star.read_star(files["star"])  # opens where it is written
    assert len(back) == len(idx)
    np.testing.assert_array_equal(back.image_paths, table.image_paths[idx])
    np.testing.assert_array_equal(back.image_indices, table.image_indices[idx])
    np.testing.assert_allclose(back.pixel_size_angstrom, table.pixel_size_angstrom[idx])
    if table.optics is not None:
        assert back.optics is not None
        assert list(back.optics.columns) == list(table.optics.columns)
        np.testing.assert_array_equal(back.optics.to_numpy(), table.optics.to_numpy())
    np.testing.assert_allclose(back.rotations, table.rotations[idx], atol=1e-12)


def test_cluster_subsets_number_from_first():
    subs = cluster_subsets(np.array([0, 1, 1, -1, 0]), None, "class", first=1)
    assert list(subs) == ["class_001", "class_002"]
    np.testing.assert_array_equal(subs["class_001"], [0, 4])
    merged = cluster_subsets(np.array([0, 1, 2]), [[0, 2]], "class", first=1)
    np.testing.assert_array_equal(merged["classes_001_003"], [0, 2])
