"""DynaMight's loss weights: lambda from the calibration pass against hand-computed gradient
norms (per batch and accumulated), and the KL weight's warm-up ramp."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hetero.models.dynamight import epoch as E
from hetero.utils.errors import ConfigError
from tests.models.test_dynamight import make_batch, small_model


@pytest.mark.parametrize("norm, batch_size", [("per_batch", 100), ("per_batch", 2), ("accumulated", 2)])
def test_calibration_equals_the_gradient_norm_ratio(norm, batch_size):
    """lambda_h from the module's calibration pass = factor * ||grad L_data|| / ||grad R|| over
    that half's decoder, computed here by hand on the same particles (posterior sigma ~ 0, so
    the sampled z is mu); over several batches: the sum of the batches' norms (reference), or the
    norm of their summed gradients (``regularization_norm=accumulated``)."""
    m = small_model(calibration_fraction=1.0, boundary_batch_size=batch_size,
                    loss={"regularization_norm": norm})
    for vae in m.halves:
        torch.nn.init.normal_(vae.decoder.out.weight, std=0.1)
        with torch.no_grad():
            vae.encoder.logstd.bias.fill_(-30.0)  # sigma ~ 0: z = mu
            vae.encoder.logstd.weight.zero_()
    batch = make_batch(8, 16, 4.0, seed=3)
    ds = SimpleNamespace(read_batch=lambda pos: {k: v[torch.as_tensor(pos)] for k, v in batch.items()})
    dm = SimpleNamespace(train_dataset=ds, table=SimpleNamespace(half_set=batch["half"].numpy()),
                         train_indices=np.arange(8))
    m._trainer = SimpleNamespace(datamodule=dm, precision="32-true")
    E.rebuild_graphs(m)
    E.calibrate_regularization(m)
    prep = m.prepare(batch)

    def flat(grads):
        return torch.cat([g.reshape(-1) for g in grads])

    for h, vae in enumerate(m.halves):
        mine = torch.nonzero(prep.half == h).flatten()
        params = list(vae.decoder.parameters())
        grads = {"data": [], "geometric": []}
        for start in range(0, len(mine), batch_size):
            sel = torch.zeros(len(prep), dtype=torch.bool)
            sel[mine[start : start + batch_size]] = True
            out = vae.losses(prep.select(sel), True, None, 0.0, m.regularizer, m.graphs[h], 1.0, sample=False)
            for key in grads:
                grads[key].append(flat(torch.autograd.grad(out[key], params, retain_graph=True)))
        if norm == "accumulated":
            gd, gg = (torch.stack(grads[k]).sum(0).norm() for k in ("data", "geometric"))
        else:
            gd, gg = (torch.stack([g.norm() for g in grads[k]]).sum() for k in ("data", "geometric"))
        assert float(m.reg_weight[h]) == pytest.approx(0.9 * float(gd / gg), rel=1e-4)
    m._trainer = None


def test_an_unknown_regularization_norm_is_refused():
    with pytest.raises(ConfigError, match="regularization_norm must be per_batch or accumulated"):
        small_model(loss={"regularization_norm": "mean"})
    with pytest.raises(ConfigError, match="got null"):  # `loss.regularization_norm=null`
        small_model(loss={"regularization_norm": None})


@pytest.mark.parametrize("key", ["regularization_factor", "regularization_floor", "kld_factor"])
def test_loss_weights_must_be_finite_and_not_negative(key):
    """A negative regularization_factor made lambda negative (rewarding distortion) and inf
    stopped training two epochs later as a 'non-finite gradient': both are refused up front."""
    floor = key == "regularization_floor"  # divides the data gradient norm: must be > 0
    for bad in (-1.0, float("inf"), "abc", None, True, *((0,) if floor else ())):
        with pytest.raises(ConfigError, match=f"loss.{key} must be a finite number {'>' if floor else '>='} 0"):
            small_model(loss={key: bad})
    if not floor:
        assert getattr(small_model(loss={key: 0}), key if key != "kld_factor" else "kl_beta") == 0


def test_kl_weight_is_constant_or_ramps_from_zero_after_warm_up():
    """``loss.kld_warmup_epochs``: beta = kld_factor / D^2 throughout (0, the default), or a linear
    ramp from 0 at the first deformation epoch to beta after that many epochs."""
    beta = 0.01 / 16**2
    assert small_model().kl_weight == pytest.approx(beta)
    m = small_model(loss={"kld_warmup_epochs": 4})
    warmup = m.schedule.n_warmup_epochs
    expected = {0: 0.0, warmup: 0.0, warmup + 1: 0.25, warmup + 3: 0.75, warmup + 4: 1.0, warmup + 40: 1.0}
    for epoch, fraction in expected.items():
        m._trainer = SimpleNamespace(current_epoch=epoch)
        assert m.kl_weight == pytest.approx(fraction * beta), epoch
    m._trainer = None
    for bad in (-1, 1.5, "abc", True):
        with pytest.raises(ConfigError, match="kld_warmup_epochs must be a whole number of epochs >= 0"):
            small_model(loss={"kld_warmup_epochs": bad})
