"""class3d end to end on small synthetic data: one class equals the shared backprojection,
replicates in one pass equal separate runs, empty classes are reseeded, Lightning resume is
exact and DDP (two CPU processes) equals one process."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from hetero.models.class3d import leave_one_group_out
from hetero.physics.ctf import ctf_table_compute
from hetero.physics.reconstruction import BackprojectionAccumulator
from hetero.tasks.train import train
from tests.helpers import compose_train

CLASS3D = ["model=class3d", "model.n_classes=2"]


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


def test_recovers_the_discrete_states_at_high_snr(tmp_path):
    """The built-in discrete set (3 states, SNR 1, box 24) with K = 3: ARI >= 0.95."""
    from sklearn.metrics import adjusted_rand_score

    from hetero.data.synthetic import load_truth

    cfg, dm = _setup(tmp_path, ["data.particles.n_particles=450", "data.particles.n_states=3",
                                "data.batch_size=64"])
    model = _model(cfg, dm, n_classes=3)
    _iterate(model, list(dm.train_dataloader()), 8)
    index, post = _posteriors(model, list(dm.predict_dataloader()))
    truth = load_truth(dm.truth_dir)["labels"][index.numpy()]
    assert adjusted_rand_score(truth, post.argmax(1).numpy()) >= 0.95
    assert float(model.hist_changes[-1, 0]) < 0.05          # converged: assignments settled
    # RELION's likelihood leaves the origin out (invariance to additive offsets of the maps)
    state, _ = model._expectation_state()
    assert torch.all(state.inv_sigma2[:, state.shell == 0] == 0)
    assert torch.all(state.inv_sigma2[:, state.shell == 1] > 0)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_resume_from_last_checkpoint_is_exact(tmp_path):
    common = [*CLASS3D, "data.particles.n_particles=160"]
    train(compose_train(tmp_path / "straight", [*common, "trainer.max_epochs=3"]))
    train(compose_train(tmp_path / "resumed", [*common, "trainer.max_epochs=2"]))
    train(compose_train(tmp_path / "resumed", [*common, "trainer.max_epochs=3", "ckpt_path=last"]))
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert a.keys() == b.keys() and int(a["iteration"]) == 3 and a["hist_loglik"].shape[0] == 3
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_ddp_equals_one_process(tmp_path):
    """Two CPU processes (gloo), each E-stepping half of the particles, all-reduced M-step:
    the same maps, priors and posteriors as one process."""
    common = [*CLASS3D, "data.particles.n_particles=160", "trainer.max_epochs=2"]
    train(compose_train(tmp_path / "one", common))
    train(compose_train(tmp_path / "ddp", [*common, "trainer=ddp_sim"]))
    a, b = _state(tmp_path / "one"), _state(tmp_path / "ddp")
    scale = float(a["maps"].abs().max())
    torch.testing.assert_close(a["maps"], b["maps"], rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(a["prior"], b["prior"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a["sigma2"], b["sigma2"], rtol=1e-5, atol=0)
    assert torch.equal(a["assignment"], b["assignment"])
    cfg, dm = _setup(tmp_path / "one", ["data.particles.n_particles=160"])
    batches = list(dm.predict_dataloader())
    posts = []
    for state in (a, b):
        model = _model(cfg, dm)
        model.load_state_dict(state)
        posts.append(_posteriors(model, batches)[1])
    # float32 maps equal to 1e-4 of their scale (summation order) move sharp posteriors by ~1e-4
    torch.testing.assert_close(posts[0], posts[1], rtol=0, atol=1e-3)


def test_the_progress_bar_shows_the_iteration_just_finished(tmp_path):
    """The bar reads ``trainer.progress_bar_metrics`` in its epoch-end hook, which Lightning runs
    before the module's: the iteration's values must be there by then (logged at the validation
    end), not one iteration late."""
    import lightning as L

    seen: list[float] = []

    class Bar(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(float(trainer.progress_bar_metrics.get("train/changes", float("nan"))))

    cfg, dm = _setup(tmp_path, ["data.particles.n_particles=160"])
    model = _model(cfg, dm)
    trainer = L.Trainer(max_epochs=3, callbacks=[Bar()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(model, datamodule=dm)
    changes = model.hist_changes[:, 0].tolist()  # NaN for the seeding iteration
    assert len(seen) == 3 and seen[1:] == [pytest.approx(c, abs=1e-6) for c in changes[1:]], (seen, changes)
    assert changes[1] != changes[2]  # the check can fail: two different iterations
