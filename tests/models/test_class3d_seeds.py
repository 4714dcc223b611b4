"""class3d finds two planted states whatever its seed, and says so when its classes are degenerate.

Two states of the built-in molecule at SNR 1 (400 particles, 64 px at 3 Å, classified at box 32):
with the default start (``init=random_subsets``, RELION's seeds from random subsets) every seed
recovers the states in 5 iterations; the former default (``init=consensus``: the consensus
perturbed per class) fell into view-dependent splits for 2 of these 5 seeds (ARI 0.64 and 0.24;
5 of 10 seeds below 0.8), and such a split must be reported (view bias, small classes)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from hydra.utils import instantiate
from sklearn.metrics import adjusted_rand_score

from hetero.models.class3d.diagnostics import (
    class_diagnostics,
    class_similarity,
    view_bias,
    view_tensor_entries,
)
from hetero.physics.rotations import euler_to_matrix
from tests.helpers import compose_train

TWO_STATES = [
    "model=class3d", "model.n_classes=2", "data.particles.n_states=2", "data.particles.snr=1.0",
    "data.particles.n_particles=400", "data.particles.box_size=64", "data.particles.pixel_size_angstrom=3.0",
    "data.box_size=32", "data.val_fraction=0", "data.batch_size=100",
]


def _data(tmp_path):
    cfg = compose_train(tmp_path, TWO_STATES)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    from hetero.data.synthetic import load_truth

    return cfg, dm, list(dm.train_dataloader()), load_truth(dm.truth_dir)["labels"]


def _classify(cfg, dm, batches, n_iterations: int, **kw):
    model = instantiate(cfg.model, **{**dm.info(), "n_iterations": n_iterations, **kw})
    for _ in range(n_iterations):
        model.on_train_epoch_start()
        for i, b in enumerate(batches):
            model.training_step(b, i)
        model._maximize()
    out = [model.predict_step(b) for b in batches]
    index = torch.cat([o["index"] for o in out]).numpy()
    return model, index, torch.cat([o["class_number"] for o in out]).numpy()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "degenerate" in r.getMessage()]


def test_every_seed_recovers_two_states_without_warning(tmp_path, caplog):
    """No sign of degeneracy; a run still changing class in its last iteration is told so and
    a settled one is not (seed 0 splits the states in its 5th iteration, 18 % changes)."""
    cfg, dm, batches, truth = _data(tmp_path)
    assert cfg.model.init == "random_subsets"
    aris, moving = [], []
    for seed in range(5):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            model, index, labels = _classify(cfg, dm, batches, 5, seed=seed)
        aris.append(adjusted_rand_score(truth[index], labels))
        assert model._epoch_logs["class3d/degenerate_replicates"] == 0, (seed, model._epoch_logs)
        changes = model.hist_changes[:, 0]
        # the first E-step counts the particles leaving their random seed class (about half)
        assert 0.2 < float(changes[1]) < 0.8, changes
        warned = _warnings(caplog)
        if float(changes[-1]) > 0.01:
            moving.append(seed)
            assert len(warned) == 1 and "still changing" in warned[0] and "view" not in warned[0], warned
            assert "(model.n_iterations)" in warned[0] and "init" not in warned[0], warned
        else:
            assert not warned, (seed, warned)
    assert min(aris) >= 0.8, aris
    assert 0 < len(moving) < 5, moving  # both branches exercised


def test_a_view_dependent_split_is_reported_once(tmp_path, caplog):
    """init=consensus, seed 3: a confident wrong split (ARI ~0.24, a class of ~25 % of the
    particles made of views near the poles); warned after the last iteration only."""
    cfg, dm, batches, truth = _data(tmp_path)
    with caplog.at_level(logging.WARNING):
        model, index, labels = _classify(cfg, dm, batches, 5, seed=3, init="consensus")
    assert adjusted_rand_score(truth[index], labels) < 0.5
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "view bias" in warnings[0], warnings
    assert torch.isnan(model.hist_changes[:2, 0]).all()  # no previous class before the first E-step
    assert model._epoch_logs["class3d/max_view_bias"] > 2.5
    assert model._epoch_logs["class3d/degenerate_replicates"] == 1


def _rotations(tilt_deg: np.ndarray, rng) -> torch.Tensor:
    n = tilt_deg.shape[0]
    angles = np.stack([rng.uniform(-180, 180, n), tilt_deg, rng.uniform(-180, 180, n)], 1)
    return torch.as_tensor(euler_to_matrix(torch.as_tensor(angles)), dtype=torch.float64)


def test_view_bias_of_random_and_of_polar_subsets():
    """z ~ 1 for random subsets of uniform views (chi^2_5 / 5), large for a subset of polar views."""
    rng = np.random.default_rng(0)
    n = 4000
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))          # uniform on the sphere
    v = view_tensor_entries(_rotations(tilt, rng))
    assert torch.allclose(v[:, :3].sum(1), torch.ones(n, dtype=torch.float64))   # trace of d d^T
    member = torch.as_tensor(rng.integers(0, 4, n))
    post = torch.nn.functional.one_hot(member, 4).double()
    z = view_bias(post.T @ v, post.sum(0), v.sum(0), n)
    assert float(z.max()) < 2.5 and 0.3 < float(z.mean()) < 1.8, z
    polar = torch.as_tensor(np.abs(np.cos(np.radians(tilt))) > 0.6)
    post = torch.stack([polar, ~polar], 1).double()
    assert float(view_bias(post.T @ v, post.sum(0), v.sum(0), n)[0]) > 10


def test_small_and_identical_classes_are_named():
    rng = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 16, 16, 16, generator=rng)
    maps = torch.stack([a, a.clone(), b])
    sim = class_similarity(maps, radius=6)
    assert abs(float(sim[0, 1]) - 1) < 1e-9 and abs(float(sim[0, 2])) < 0.2
    views = torch.zeros(3, 6, dtype=torch.float64)
    views[:, 2] = torch.tensor([500.0, 495.0, 5.0])                 # all views along z
    facts = class_diagnostics(maps, torch.tensor([500.0, 495.0, 5.0]), views,
                              torch.tensor([0, 0, 1000.0, 0, 0, 0], dtype=torch.float64), 1000.0, radius=6)
    text = "\n".join(facts["messages"])
    assert "class 3 holds 0.5%" in text and "classes 1 and 2 are near-identical" in text, text
    assert facts["min_class_fraction"] == 0.005 and facts["max_class_similarity"] > 0.999
