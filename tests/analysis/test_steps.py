"""Each shared analysis step alone, on a small fake result (no run directory, no training)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hetero.analysis.metrics import ari_ami
from hetero.analysis.steps import resolve_step
from hetero.analysis.steps.clustering import clustering
from hetero.analysis.steps.decoded import decoded_maps, traversals
from hetero.analysis.steps.embedding import embedding
from hetero.analysis.steps.ground_truth import ground_truth
from hetero.analysis.steps.reconstruction import reconstruction
from hetero.analysis.steps.report import report
from hetero.analysis.steps.subsets import subsets
from hetero.analysis.volumes import resample_to_box
from hetero.data.particles import ParticleTable
from tests.analysis.fakes import APIX, BOX, STATES, VOXEL, blob, fake_context, fake_result


def planted(n_per_state: int = 10, seed: int = 0):
    """Embedding = blob position (Å) + noise, 3 states: ``(z (N, 2), labels (N,))``."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_state)
    z = np.stack([STATES[labels], np.zeros(len(labels))], 1) + rng.normal(0, 0.2, (len(labels), 2))
    return z.astype(np.float32), labels


def test_embedding_step(tmp_path):
    z, labels = planted()
    ctx = fake_context(tmp_path, fake_result(z), ["pca_components=2"])
    embedding(ctx)
    pcs = ctx.state["pca"]
    assert pcs.explained_variance_ratio[0] > 0.95  # the states lie along z[0]
    assert np.load(ctx.out / "latent" / "pca_coords.npy").shape == (30, 2)
    xy, axes, name = ctx.state["embedding_2d"]
    assert name == "pca" and axes == ("PC1", "PC2") and xy.shape == (30, 2)
    assert ctx.metrics["pca_explained_variance_ratio"][0] == pytest.approx(
        pcs.explained_variance_ratio[0]
    )
    empty = fake_context(tmp_path / "e", fake_result(np.zeros((5, 0))))
    embedding(empty)
    assert (
        "pca" not in empty.state
        and "no per-particle embedding" in empty.sections["Latent space"][0]
    )


def test_clustering_step_with_method_labels(tmp_path):
    z, labels = planted()
    method = labels.copy()
    method[:2] = -1
    ctx = fake_context(tmp_path, fake_result(z, labels=method), ["n_clusters=3"])
    clustering(ctx)
    km = ctx.state["clusters"]
    assert ari_ami(labels, km.labels)["ari"] == pytest.approx(1.0)
    assert (ctx.out / "clusters" / "counts.csv").read_text().count("\n") == 4
    assert ctx.metrics["method_labels"] == {"name": "class", "counts": [8, 10, 10], "first": 0, "discarded": 2}
    assert ctx.state["method_labels"] is method
    with pytest.raises(ValueError, match="n_clusters=40 is larger"):
        clustering(fake_context(tmp_path / "x", fake_result(z), ["n_clusters=40"]))


def test_decoded_maps_and_traversals(tmp_path):
    z, _ = planted()
    ctx = fake_context(tmp_path, fake_result(z), ["n_clusters=3", "pc_traversal.steps=3"])
    embedding(ctx)
    clustering(ctx)
    decoded_maps(ctx)
    traversals(ctx)
    vols = ctx.state["decoded_clusters"]
    assert vols.shape == (3, BOX, BOX, BOX)
    km = ctx.state["clusters"]
    for k, i in enumerate(km.center_indices):  # the analytic decoder: a blob at z[0] Å
        ref = resample_to_box(blob(float(z[i, 0]), 16, VOXEL)[None], VOXEL, BOX, APIX)[0]
        assert torch.allclose(vols[k], ref, atol=1e-4)
    assert len(list((ctx.out / "maps" / "decoded" / "clusters").glob("cluster_*.mrc"))) == 3
    pc1 = sorted((ctx.out / "maps" / "decoded" / "pc1").glob("pc1_*.mrc"))
    assert len(pc1) == 3 and (ctx.out / "maps" / "decoded" / "pc1" / "pc1.cxc").is_file()
    none = fake_context(tmp_path / "n", fake_result(z, decode=False), ["n_clusters=3"])
    clustering(none)
    decoded_maps(none)
    assert (
        not (none.out / "maps").exists() and "does not decode" in none.sections["Decoded maps"][0]
    )
    consensus = fake_context(tmp_path / "c", fake_result(np.zeros((4, 0))))
    decoded_maps(consensus)
    assert (consensus.out / "maps" / "decoded" / "consensus" / "consensus_000.mrc").is_file()


def test_ground_truth_step(tmp_path):
    z, labels = planted()
    truth = {
        "labels": labels,
        "volumes": torch.stack([blob(float(x), BOX, APIX) for x in STATES]),
        "kind": "discrete",
        "source": "test",
    }
    ctx = fake_context(tmp_path, fake_result(z), ["per_image_fsc_samples=6"], truth=truth)
    embedding(ctx)
    ground_truth(ctx)
    gt = ctx.metrics["ground_truth"]
    assert gt["ari"] == pytest.approx(1.0) and gt["k_true"] == 3 and gt["per_image_fsc_n"] == 6
    assert [r["state"] for r in gt["per_state_fsc"]] == [0, 1, 2]
    # Each state's decoded map is its own blob to the template Nyquist (4 Å): FSC=0.5 near there.
    assert all(r["res_0.5"] < 5.0 for r in gt["per_state_fsc"])
    assert (ctx.out / "maps" / "decoded" / "truth_states" / "state_002.mrc").is_file()
    without = fake_context(tmp_path / "w", fake_result(z), truth=None)
    ground_truth(without)
    assert "ground_truth" not in without.metrics


def test_subsets_step(tmp_path):
    z, labels = planted(4)
    n = len(z)
    table = ParticleTable(
        image_paths=np.full(n, str(tmp_path / "stack.mrcs"), dtype=object),
        image_indices=np.arange(n),
        box_size=BOX,
        pixel_size_angstrom=np.full(n, APIX),
        source="test",
    )
    dm = type("DM", (), {"table": table})()
    method = labels.copy()
    method[0] = -1
    ctx = fake_context(tmp_path, fake_result(z, labels=method), ["n_clusters=3"], datamodule=dm)
    clustering(ctx)
    subsets(ctx)
    km = ctx.state["clusters"]
    for c in range(3):
        np.testing.assert_array_equal(
            np.load(ctx.out / "subsets" / f"cluster_00{c}.npy"), np.flatnonzero(km.labels == c)
        )
        assert (ctx.out / "subsets" / f"cluster_00{c}.star").is_file()
    np.testing.assert_array_equal(np.load(ctx.out / "subsets" / "class_000.npy"), [1, 2, 3])
    assert ctx.metrics["subsets"]["class_000"] == 3
    short = fake_context(tmp_path / "s", fake_result(z[:5]), ["n_clusters=2"], datamodule=dm)
    clustering(short)
    with pytest.raises(ValueError, match="data have 12 particles but the run's embedding 5"):
        subsets(short)


def test_steps_that_need_data_fail_loudly(tmp_path):
    z, _ = planted(4)
    ctx = fake_context(tmp_path, fake_result(z), ["n_clusters=2"])
    clustering(ctx)
    from hetero.analysis.rundir import DataUnavailableError

    with pytest.raises(DataUnavailableError, match="particle subsets needs data"):
        subsets(ctx)
    with pytest.raises(DataUnavailableError, match="reconstruction from the particles"):
        reconstruction(ctx)
    off = fake_context(
        tmp_path / "off",
        fake_result(z),
        ["n_clusters=2", "subsets.enabled=false", "reconstruction.enabled=false"],
    )
    clustering(off)
    subsets(off)
    reconstruction(off)
    assert "subsets" not in off.metrics and "reconstructed" not in off.metrics


def test_report_step(tmp_path):
    z, _ = planted()
    ctx = fake_context(tmp_path, fake_result(z), ["n_clusters=3"])
    ctx.metrics.update(n_particles=30, odd=float("inf"))
    for step in ("embedding", "clustering", "decoded_maps"):
        resolve_step(step)(ctx)
    report(ctx)
    metrics = json.loads((ctx.out / "metrics.json").read_text())
    assert metrics["odd"] == "inf" and metrics["clusters"]["k"] == 3
    html = (ctx.out / "report.html").read_text()
    for name in ("Summary", "Training", "Latent space", "Clusters", "Decoded maps", "Files"):
        assert f"<h2>{name}</h2>" in html
    assert "No CSV training log" in html
    with pytest.raises(ValueError, match="unknown analysis step 'umap'"):
        resolve_step("umap")


def test_configured_steps_resolve():
    from tests.analysis.fakes import analyze_config

    cfg = analyze_config()
    assert [resolve_step(s).__name__ for s in cfg.steps] == list(cfg.steps)
    assert cfg.reconstruction.device == cfg.maps.device


def test_clustering_step_refits_when_clusters_are_specks(tmp_path):
    """n_clusters=12 on 3 tight groups of 100 plus 4 strays: clusters of < 0.5 % are refitted away
    (and said so); kmeans.min_cluster_fraction=0 keeps them."""
    rng = np.random.default_rng(0)
    z = np.concatenate([np.repeat([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], 100, axis=0)
                        + rng.normal(0, 1e-3, (300, 2)), rng.uniform(1, 4, (4, 2))]).astype(np.float32)
    ctx = fake_context(tmp_path / "a", fake_result(z), ["n_clusters=12"])
    clustering(ctx)
    m = ctx.metrics["clusters"]
    assert m["k_requested"] == 12 and m["k"] < 12 and min(m["counts"]) >= 2
    assert ctx.state["clusters"].n_clusters == m["k"]
    kept = fake_context(tmp_path / "b", fake_result(z), ["n_clusters=12", "kmeans.min_cluster_fraction=0"])
    clustering(kept)
    assert kept.metrics["clusters"]["k"] == 12


def _specks():
    rng = np.random.default_rng(0)
    return np.concatenate([np.repeat([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], 100, axis=0)
                           + rng.normal(0, 1e-3, (300, 2)), rng.uniform(1, 4, (4, 2))]).astype(np.float32)


def test_subset_ids_beyond_the_clusters_kept_are_refused_at_clustering(tmp_path):
    """subsets.clusters=[10] with n_clusters=12 was valid until k-means kept fewer clusters; it
    failed only in the subsets step (after the reconstructions) with a traceback. Now a
    ConfigError at the clustering step says why the ids shrank."""
    from hetero.utils.errors import ConfigError

    ctx = fake_context(tmp_path / "a", fake_result(_specks()), ["n_clusters=12", "subsets.clusters=[0,[1,10]]"])
    with pytest.raises(ConfigError, match=r"ids \[10\] do not exist: k-means kept \d+ of the n_clusters=12"):
        clustering(ctx)
    ok = fake_context(tmp_path / "b", fake_result(_specks()), ["n_clusters=12", "subsets.clusters=[0,[1,2]]"])
    clustering(ok)
    assert ok.metrics["clusters"]["k"] < 12


@pytest.mark.parametrize("fraction", ["-0.1", "1.5"])
def test_min_cluster_fraction_outside_0_1_is_refused(tmp_path, fraction):
    """Negative acted as 0 and >= the largest cluster's fraction silently kept every speck."""
    from hetero.utils.errors import ConfigError

    ctx = fake_context(tmp_path, fake_result(_specks()), ["n_clusters=12", f"kmeans.min_cluster_fraction={fraction}"])
    with pytest.raises(ConfigError, match="min_cluster_fraction must be in"):
        clustering(ctx)


def test_n_clusters_below_one_is_refused_by_the_option_check(tmp_path):
    """analyze() runs clustering.check_options before writing anything over an earlier analysis
    (n_clusters=0 failed inside k-means after the PCA files were rewritten)."""
    from hetero.analysis.steps.clustering import check_options
    from hetero.utils.errors import ConfigError

    ctx = fake_context(tmp_path, fake_result(_specks()), ["n_clusters=0"])
    with pytest.raises(ConfigError, match="n_clusters must be >= 1"):
        check_options(ctx.cfg)
    assert check_options(fake_context(tmp_path / "b", fake_result(_specks()), ["n_clusters=3"]).cfg) >= 0


def test_empty_clusters_are_called_empty_not_small(tmp_path):
    """On 3 distinct points with min_cluster_fraction=0 only empty clusters are refitted away; the
    note must not tell the user to set the option they already set."""
    z = np.repeat(np.eye(3, dtype=np.float32), 20, axis=0)
    ctx = fake_context(tmp_path, fake_result(z), ["n_clusters=8", "kmeans.min_cluster_fraction=0"])
    clustering(ctx)
    assert ctx.metrics["clusters"]["k"] == 3
    text = " ".join(ctx.sections["Clusters"])
    assert "empty clusters" in text and "min_cluster_fraction=0 to keep" not in text
