"""class3d end to end on small synthetic data: one class equals the shared backprojection,
replicates in one pass equal separate runs, empty classes are reseeded, Lightning resume is
exact and DDP (two CPU processes) equals one process."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from hetero.models.class3d import leave_one_group_out
from hetero.physics.ctf import ctf_table_compute
from hetero.physics.reconstruction import BackprojectionAccumulator
from hetero.tasks.train import train
from tests.helpers import compose_train

CLASS3D = ["model=class3d", "model.n_classes=2", "data.sampler=random"]


def _setup(tmp_path: Path, overrides: list[str]):
    cfg = compose_train(tmp_path, [*CLASS3D, *overrides])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return cfg, dm


def _model(cfg, dm, **model_overrides):
    return instantiate(cfg.model, **{**dm.info(), **model_overrides})


def _iterate(model, batches, n: int) -> None:
    """``n`` EM iterations (epochs) without a Trainer, as Lightning would run them."""
    for _ in range(n):
        model.on_train_epoch_start()
        for i, b in enumerate(batches):
            model.training_step(b, i)
        model._maximize()


def _posteriors(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Particle indices (sorted) and their posteriors ``(n, U * K)``."""
    out = [model.predict_step(b) for b in batches]
    index = torch.cat([o["index"] for o in out])
    order = torch.argsort(index)
    return index[order], torch.cat([o["posterior"] for o in out])[order]


def test_one_class_and_noiseless_images_give_the_shared_backprojection(tmp_path):
    """K = 1, no prior: the class map of an EM iteration is BackprojectionAccumulator's
    reconstruction of the same images (CTF on acc.ctf_size), to float precision."""
    cfg, dm = _setup(tmp_path, ["data.particles.snr=null", "data.particles.n_particles=120"])
    model = _model(cfg, dm, n_classes=1, do_map=False, flatten_solvent=False, ini_high=0,
                   accumulator_dtype="float64")
    batches = list(dm.train_dataloader())
    _iterate(model, batches, 2)
    acc = BackprojectionAccumulator(model.box_size, model.pad_factor)
    for b in batches:
        ctf = ctf_table_compute(b["ctf"].double(), acc.ctf_size, b["apix"].double())
        acc.add(b["image"].double(), b["rotation"].double(), -b["origin_px"].double(), ctf)
    want = acc.reconstruct().float()
    got = model.maps[0, 0]
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    assert float(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1]) > 0.999999


def test_replicates_in_one_pass_equal_separate_runs(tmp_path):
    """U = 3 overlapping subsets classified together give each subset's separate run (seed + u)."""
    cfg, dm = _setup(tmp_path, ["data.particles.n_particles=200"])
    n = dm.info()["n_particles"]
    member = leave_one_group_out(n, 3, seed=0)
    batches = list(dm.train_dataloader())
    together = _model(cfg, dm, subsets=member.numpy(), seed=5)
    _iterate(together, batches, 3)
    index, post = _posteriors(together, batches)
    for u in range(3):
        alone = _model(cfg, dm, subsets=member[:, u : u + 1].numpy(), seed=5 + u)
        _iterate(alone, batches, 3)
        assert torch.allclose(together.maps[u], alone.maps[0], atol=1e-5 * float(alone.maps.abs().max()))
        assert torch.allclose(together.sigma2[u], alone.sigma2[0], rtol=1e-6)
        assert torch.allclose(together.hist_class_weight[:, u], alone.hist_class_weight[:, 0], rtol=1e-6)
        assert torch.allclose(post[:, 2 * u : 2 * u + 2], _posteriors(alone, batches)[1], atol=1e-5)
        # particles outside the subset have no posterior in it, the others sum to 1
        inside = member[index, u]
        assert float(post[~inside, 2 * u : 2 * u + 2].abs().sum()) == 0
        assert torch.allclose(post[inside, 2 * u : 2 * u + 2].sum(1), torch.ones(int(inside.sum())))


def test_an_empty_class_is_reseeded_from_the_largest(tmp_path, caplog):
    cfg, dm = _setup(tmp_path, ["data.particles.n_particles=160"])
    model = _model(cfg, dm, n_classes=3)
    batches = list(dm.train_dataloader())
    _iterate(model, batches, 2)
    model.prior[0, 2] = 0.0            # class 3 attracts no particle in the next E-step
    model._version += 1
    with caplog.at_level(logging.INFO):
        _iterate(model, batches, 1)
    assert any("class 3 was empty" in r.getMessage() for r in caplog.records)
    assert float(model.prior[0, 2]) > 0
    donor = int(torch.argmax(model.hist_class_weight[-1, 0]))
    a, b = model.maps[0, 2].flatten(), model.maps[0, donor].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.8
