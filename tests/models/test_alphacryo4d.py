"""AlphaCryo4D stages 1, 3 and 4: shuffling, the residual autoencoder and its volumes, the
manifold input."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from hetero.data.volumes import VolumeDataModule, scale_volume, standardize_volume
from hetero.models.alphacryo4d import (
    ResidualAutoencoder3d,
    VolumeAutoencoder,
    extract_features,
    leave_one_out,
    shuffle_unions,
)
from hetero.models.alphacryo4d.manifold import (
    standardize_columns,
    tsne,
    volume_distances,
    volume_sq_distances,
)


# ----------------------------------------------------------------------------- stage 1
@pytest.mark.parametrize("n,fold,batch", [(1003, 3, None), (1000, 4, None), (2501, 3, 1000)])
def test_every_particle_is_in_exactly_m_unions(n, fold, batch):
    s = leave_one_out(n, fold=fold, seed=7, batch_size=batch)
    assert np.all(s.membership_counts() == fold)  # nobody dropped, nobody extra
    n_batches = 1 if batch is None else -(-n // batch)
    assert s.n_unions == n_batches * (fold + 1)
    for u, union in enumerate(s.unions):
        b = s.union_batch[u]
        in_batch = np.flatnonzero(s.batch == b)
        missing = np.setdiff1d(in_batch, union)
        # leave-one-group-out: the union lacks exactly one group of its batch
        assert len(np.unique(s.group[missing])) == 1
        assert np.all(np.isin(union, in_batch))
    sizes = np.bincount(s.group[s.batch == 0])
    assert sizes.max() - sizes.min() <= 1


def test_shuffling_is_deterministic_per_seed():
    a, b, c = (leave_one_out(500, 3, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a.unions, b.unions))
    assert not all(np.array_equal(x, y) for x, y in zip(a.unions, c.unions))


def test_bootstrap_windows_and_leave_one_out_are_the_same_family():
    s = shuffle_unions(900, n_subsets=30, window=9, seed=0)
    assert s.n_unions == 30 and np.all(s.membership_counts() == 9)
    loo = leave_one_out(900, fold=3, seed=0)
    win = shuffle_unions(900, n_subsets=4, window=3, seed=0)
    assert sorted(map(tuple, loo.unions)) == sorted(map(tuple, win.unions))
    with pytest.raises(ValueError):
        shuffle_unions(10, n_subsets=4, window=4)
    with pytest.raises(ValueError):
        leave_one_out(3, fold=3)


# ----------------------------------------------------------------------------- stage 3
def test_autoencoder_architecture_matches_the_reference_code():
    net = ResidualAutoencoder3d()
    assert sum(p.numel() for p in net.parameters()) == 1709  # the shipped final_model.h5
    x = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        assert net.encode(x).shape == (2, 1, 2, 2, 2) and net(x).shape == x.shape
        paper = ResidualAutoencoder3d(first_stride=2)
        assert paper.encode(x).shape == (2, 1, 1, 1, 1) and paper(x).shape == x.shape
        assert float(net(x).min()) >= 0 and float(net(x).max()) <= 1


def test_volumes_are_scaled_one_by_one_to_unit_range():
    rng = np.random.default_rng(0)
    vols = rng.normal(0, 1, (5, 8, 8, 8)) * np.arange(1, 6)[:, None, None, None] + 3
    for v in vols:
        s = scale_volume(v)
        assert s.min() == 0 and s.max() == pytest.approx(1, abs=1e-6)
        z = standardize_volume(v)
        assert abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1, abs=1e-5)
    dm = VolumeDataModule(vols.astype(np.float32), batch_size=2, val_fraction=0.4, split_seed=3)
    dm.setup("fit")
    assert len(dm.val_indices) == 2 and not set(dm.val_indices) & set(dm.train_indices)
    batch = next(iter(dm.predict_dataloader()))
    assert batch["volume"].shape == (2, 1, 8, 8, 8)
    assert torch.allclose(batch["volume"].amax((1, 2, 3, 4)), torch.ones(2))


def _volumes(n=24, d=16, seed=0):
    """Two families of blobs (a shifted sphere), so there is something to learn."""
    rng = np.random.default_rng(seed)
    g = np.mgrid[:d, :d, :d].astype(np.float32) - d / 2
    out = []
    for i in range(n):
        c = np.array([3.0 if i % 2 else -3.0, 0, 0]) + rng.normal(0, 0.5, 3)
        r2 = sum((g[k] - c[k]) ** 2 for k in range(3))
        out.append(np.exp(-r2 / 8) + 0.05 * rng.normal(size=(d, d, d)))
    return np.stack(out).astype(np.float32)


def test_features_come_from_the_trained_weights(tmp_path):
    """The reference extracted features with randomly initialised weights. Here features
    change when the weights do, and a model reloaded from the checkpoint gives the trained
    model's features exactly."""
    L.seed_everything(0)
    dm = VolumeDataModule(_volumes(n=16, d=8), batch_size=4, val_fraction=0.25)
    model = VolumeAutoencoder(channels=(2, 1))
    before = extract_features(model, dm.predict_dataloader())
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(ckpt)
    after = extract_features(model, dm.predict_dataloader())
    assert not np.allclose(before, after)
    fresh = VolumeAutoencoder(channels=(2, 1))
    assert not np.allclose(extract_features(fresh, dm.predict_dataloader()), after)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(extract_features(fresh, dm.predict_dataloader()), after)
    # eval mode: a volume's features do not depend on the rest of its batch
    single = np.stack([extract_features(fresh, [b])[0] for b in _singletons(dm)])
    np.testing.assert_allclose(single, after, rtol=1e-5, atol=1e-6)
    assert "val/loss" in trainer.callback_metrics and "train/loss" in trainer.callback_metrics


def _singletons(dm):
    for batch in dm.predict_dataloader():
        for i in range(len(batch["index"])):
            yield {"volume": batch["volume"][i : i + 1], "index": torch.tensor([0])}


def test_plateau_schedule_and_l2_penalty():
    model = VolumeAutoencoder(l2_regularization=1e-3)
    conf = model.configure_optimizers()
    sched = conf["lr_scheduler"]["scheduler"]
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert sched.factor == 0.1 and sched.patience == 3 and sched.threshold == 1e-4
    assert conf["optimizer"].defaults["lr"] == 1e-3 and conf["optimizer"].defaults["eps"] == 1e-7
    l2 = model.net.kernel_l2()
    manual = sum(
        (m.weight**2).sum() + (m.bias**2).sum()
        for m in model.net.modules()
        if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)
    )
    assert torch.allclose(l2, manual)


# ----------------------------------------------------------------------------- stage 4
def test_volume_distances_are_the_concatenated_vector_distances():
    vols = _volumes(n=6, d=8)
    feats = np.random.default_rng(1).normal(size=(6, 5)) * [1, 10, 100, 0, 1]
    z = np.stack([standardize_volume(v).ravel() for v in vols]).astype(np.float64)
    f = standardize_columns(feats)
    assert np.allclose(f.std(0)[[0, 1, 2, 4]], 1) and np.all(f[:, 3] == 0)
    x = np.hstack([2.0 * z, 0.5 * f])
    brute = ((x[:, None] - x[None]) ** 2).sum(-1)
    d2 = volume_distances(vols, feats, volume_weight=2.0, feature_weight=0.5)
    np.testing.assert_allclose(d2, brute, rtol=1e-6, atol=1e-6)
    # slabs of one z-plane give the same distances
    np.testing.assert_allclose(volume_sq_distances(vols, slab_bytes=1), volume_sq_distances(vols), rtol=1e-10)


def test_tsne_is_deterministic_and_separates_two_families():
    vols = _volumes(n=30, d=8)
    d2 = volume_distances(vols, None)
    a, b = (tsne(d2, perplexity=5, max_iter=500, learning_rate=50, method="exact", seed=0) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    fam = np.arange(30) % 2
    e2 = ((a[:, None] - a[None]) ** 2).sum(-1)
    np.fill_diagonal(e2, np.inf)
    assert np.all(fam[np.argmin(e2, 1)] == fam)  # every volume's neighbour is of its family


# ----------------------------------------------------------------------------- volume alignment
def test_rigid_alignment_undoes_a_rotation_and_shift():
    from hetero.models.alphacryo4d.alignment import align_volume, shift_volume
    from hetero.physics.projection import rotate_volume
    from hetero.physics.rotations import geodesic_distance_deg, random_rotations

    d = 24
    g = np.mgrid[:d, :d, :d].astype(np.float64) - d / 2
    ref = np.zeros((d, d, d))
    for c, w in (((0, 0, 4), 1.0), ((3, -2, -3), 0.7), ((-4, 3, 0), 0.5)):  # asymmetric
        ref += w * np.exp(-sum((g[i] - c[i]) ** 2 for i in range(3)) / 4)
    rot = random_rotations(1, generator=torch.Generator().manual_seed(3))
    moved = shift_volume(rotate_volume(torch.from_numpy(ref), rot)[0], torch.tensor([2.0, -1.0, 3.0]))
    aligned, info = align_volume(moved.numpy(), ref, search_size=16, n_coarse=600, seed=0)
    assert info["score"] > 0.98
    cc = np.corrcoef(aligned.ravel(), ref.ravel())[0, 1]
    assert cc > 0.98
    # the rotation found undoes the applied one: A_found @ R = identity
    err = geodesic_distance_deg(torch.from_numpy(info["rotation"]) @ rot[0], torch.eye(3, dtype=torch.float64))
    assert float(err) < 8.0  # a few degrees: trilinear interpolation blurs the blobs


def test_volume_loaders_shard_over_ddp_ranks():
    from types import SimpleNamespace

    vols = np.random.default_rng(0).random((20, 8, 8, 8)).astype(np.float32)
    seen = []
    for rank in range(2):
        dm = VolumeDataModule(vols, batch_size=2, val_fraction=0.2, indices=np.arange(1, 20))
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        seen.append(np.concatenate([b["index"].numpy() for b in dm.train_dataloader()]))
        val = np.concatenate([b["index"].numpy() for b in dm.val_dataloader()])
        assert set(val) <= set(dm.val_indices)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) <= set(dm.train_indices) and 0 not in set(seen[0]) | set(seen[1])
