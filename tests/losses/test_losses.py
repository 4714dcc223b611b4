"""OPUS-DSD loss terms, schedules and the running SNR on hand-made inputs."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from hetero.losses import (
    ConstantSchedule,
    CosineSchedule,
    KLDivergence,
    L1Norm,
    MultiPoseReconstructionLoss,
    RunningSNR,
    SawtoothSchedule,
    StructuralDisentanglementPrior,
    TotalVariation,
    batch_power,
    gaussian_kl,
    interclass_prior,
    intraclass_prior,
    multi_pose_nll,
    squared_distances,
    squared_errors,
)

CONF = Path(__file__).resolve().parents[2] / "conf"


# ----------------------------------------------------------------------------- reconstruction
def test_single_pose_nll_is_half_squared_error():
    x, y = torch.randn(3, 8, 8), torch.randn(3, 1, 8, 8)
    nll, w = multi_pose_nll(squared_errors(y, x))
    expected = 0.5 * ((x - y[:, 0]) ** 2).sum((-2, -1))
    torch.testing.assert_close(nll, expected)
    assert torch.all(w == 1)


def test_multi_pose_nll_is_soft_minimum():
    sq = torch.tensor([[10.0, 10.0, 10.0], [0.0, 1000.0, 1000.0]])
    nll, w = multi_pose_nll(sq)
    # Identical poses: e/2 - log P.  One dominant pose: its e/2 (here 0).
    torch.testing.assert_close(nll, torch.tensor([5.0 - math.log(3), 0.0]))
    torch.testing.assert_close(w[0], torch.full((3,), 1 / 3))
    assert w[1, 0] > 0.999


def test_reconstruction_loss_scaling_and_mask():
    x, y = torch.zeros(2, 4, 4), torch.ones(2, 1, 4, 4)
    term = MultiPoseReconstructionLoss()
    out = term(y, x)
    torch.testing.assert_close(out["loss"], torch.tensor(0.5))  # per pixel: 1/2 * 16 / 16
    mask = torch.zeros(4, 4)
    mask[:2] = 1
    out = term(y, x, mask=mask)
    torch.testing.assert_close(out["loss"], torch.tensor(0.5))  # 1/2 * 8 / 8
    running = MultiPoseReconstructionLoss(noise_model="running")(y, x, noise_var=torch.tensor(2.0))
    torch.testing.assert_close(running["loss"], torch.tensor(0.25))
    with pytest.raises(ValueError):
        MultiPoseReconstructionLoss(noise_model="bad")


def test_reconstruction_gradient_is_posterior_weighted():
    """d nll / d Y_p = w_p (Y_p - X): the reference's EM form has the same gradient."""
    x = torch.randn(1, 5, 5)
    y = torch.randn(1, 3, 5, 5, requires_grad=True)
    nll, w = multi_pose_nll(squared_errors(y, x))
    nll.sum().backward()
    torch.testing.assert_close(y.grad, w[..., None, None] * (y.detach() - x[:, None]))


# ----------------------------------------------------------------------------- KL
def test_kl_of_standard_normal_is_zero_and_known_value():
    assert gaussian_kl(torch.zeros(4, 8), torch.zeros(4, 8)).abs().max() < 1e-7
    mu, logstd = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    # 0.5 * mu^2 + (sigma^2 - 1)/2 - log sigma
    expected = 0.5 + (1.5 - math.log(2.0))
    torch.testing.assert_close(gaussian_kl(mu, logstd), torch.tensor([expected]))
    kl = KLDivergence(weight=2.0)
    assert kl.effective_weight(snr=0.1, beta=0.5) == pytest.approx(0.1)
    assert KLDivergence(weight=2.0, snr_scaled=False).effective_weight(0.1, 0.5) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- volume priors
def test_tv_of_constant_is_zero_and_ramp_known():
    assert TotalVariation()(torch.full((2, 6, 6, 6), 3.0)).item() == pytest.approx(0.0, abs=1e-7)
    ramp = torch.arange(6.0)[None, None, None, :].expand(1, 6, 6, 6)  # d/dx = 1 everywhere
    # paper normalisation: sum over the 5^3 forward-difference voxels / N
    assert TotalVariation(eps=0.0)(ramp).item() == pytest.approx(125 / 6)
    assert TotalVariation(eps=0.0, normalization="mean")(ramp).item() == pytest.approx(1.0)


def test_l1_known_value():
    v = torch.zeros(1, 4, 4, 4)
    v[0, 0, 0, :2] = torch.tensor([-2.0, 3.0])
    assert L1Norm()(v).item() == pytest.approx(5.0 / 4)
    assert L1Norm(normalization="mean")(v).item() == pytest.approx(5.0 / 64)


# ----------------------------------------------------------------------------- disentanglement
def test_squared_distances():
    a, b = torch.randn(5, 3), torch.randn(7, 3)
    torch.testing.assert_close(squared_distances(a, b), torch.cdist(a, b) ** 2, atol=1e-5, rtol=1e-5)


def _codes(by_structure: bool, n_per: int = 16, seed: int = 0):
    """2 structures x 2 projection classes; codes clustered by structure or by pose class."""
    g = torch.Generator().manual_seed(seed)
    structure = torch.arange(4 * n_per) % 2
    pose = (torch.arange(4 * n_per) // 2) % 2
    label = structure if by_structure else pose
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    mu = centres[label] + 0.3 * torch.randn(4 * n_per, 2, generator=g)
    return mu, pose


@pytest.mark.parametrize("seed", [0, 1])
def test_prior_prefers_codes_clustered_by_structure(seed):
    """Eqs. 5-7 are lower when codes cluster by 3-D structure rather than by projection class:
    the intraclass repulsion separates same-view images of different structures and the
    interclass attraction pulls different views of one structure together."""
    prior = StructuralDisentanglementPrior(k_inter=8, n_far=16, n_samples=64)
    values = {}
    for by_structure in (True, False):
        mu, pose = _codes(by_structure, seed=seed)
        bank, bank_pose = _codes(by_structure, seed=seed + 10)
        out = prior(mu, pose, bank, bank_pose)
        values[by_structure] = out
        assert set(out) == {"intra_attraction", "intra_repulsion", "inter_attraction", "inter_repulsion", "total"}
    good, bad = values[True], values[False]
    assert good["total"] < bad["total"]
    assert good["intra_repulsion"] < bad["intra_repulsion"]
    assert good["inter_attraction"] < bad["inter_attraction"]


def test_intraclass_prior_values():
    mu = torch.tensor([[0.0], [1.0], [3.0]])
    classes = torch.tensor([0, 0, 1])
    attract, repel = intraclass_prior(mu, classes, k=4, eps=0.0)
    # images 0 and 1 are each other's only partner (d = 1); image 2 has none.
    torch.testing.assert_close(attract, torch.tensor([math.log(2), math.log(2), 0.0]))
    torch.testing.assert_close(repel, torch.tensor([math.log(2), math.log(2), 0.0]))
    ref = intraclass_prior(torch.tensor([[0.0], [0.5]]), torch.tensor([0, 0]), eps=0.0, repulsion_weighting="reference")[1]
    torch.testing.assert_close(ref, torch.full((2,), 0.25 * math.log(5.0)))


def test_interclass_prior_ignores_same_class_and_scales_k():
    mu = torch.tensor([[0.0]])
    bank = torch.tensor([[0.1], [1.0], [2.0], [10.0]])
    bank_cls = torch.tensor([0, 1, 1, 1])  # the nearest code shares the query's class
    attract, repel = interclass_prior(mu, torch.tensor([0]), bank, bank_cls, k=1, n_far=1, reference_size=1, eps=0.0)
    torch.testing.assert_close(attract, torch.tensor([math.log(2.0)]))
    torch.testing.assert_close(repel, torch.tensor([math.log1p(1 / 100.0)]))
    # No other-class codes: zero.
    z = interclass_prior(mu, torch.tensor([1]), bank[1:], bank_cls[1:])
    assert z[0].item() == 0 and z[1].item() == 0


def test_prior_effective_weight():
    p = StructuralDisentanglementPrior(weight=2.0, snr_gate=None, anneal_floor=0.0)
    assert p.effective_weight(snr=0.5, beta=0.25) == pytest.approx(0.5)
    gated = StructuralDisentanglementPrior(weight=1.0, snr_gate=0.01, anneal_floor=0.05)
    assert gated.effective_weight(snr=0.01, beta=1.0) == pytest.approx(1 - math.exp(-1))
    assert gated.effective_weight(snr=1.0, beta=0.0) == pytest.approx(0.05 / 1.05)


# ----------------------------------------------------------------------------- schedules
def test_sawtooth_matches_reference():
    s = SawtoothSchedule()
    assert s(0) == pytest.approx(0.001)
    assert s(50_000) == pytest.approx(0.001 + 50_000 * 0.999e-5)
    assert s(100_000) == pytest.approx(1.0)
    assert s(120_000) == pytest.approx(1.0)
    assert s(125_000) == pytest.approx(0.001)
    assert s(175_000) == pytest.approx(s(50_000))
    assert s.unit == "images"


def test_cosine_and_constant():
    c = CosineSchedule(start=0.0, end=1.0, ramp=100, period=200, unit="steps")
    assert c(0) == pytest.approx(0.0)
    assert c(50) == pytest.approx(0.5)
    assert c(100) == pytest.approx(1.0)
    assert c(150) == pytest.approx(1.0)
    assert c(250) == pytest.approx(0.5)
    assert CosineSchedule(0.0, 1.0, 100, float("inf"))(1e9) == pytest.approx(1.0)
    assert ConstantSchedule(0.3)(12345) == 0.3
    with pytest.raises(ValueError):
        SawtoothSchedule(ramp=10, period=5)


# ----------------------------------------------------------------------------- SNR
def test_running_snr_update_and_batch_power():
    x = torch.zeros(2, 4, 4)
    y = torch.full((2, 2, 4, 4), 2.0)
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    signal, residual = batch_power(y, x, w)
    assert signal.item() == pytest.approx(64.0) and residual.item() == pytest.approx(64.0)
    snr = RunningSNR(initial=0.01, rate=0.5)
    snr.update(signal, residual, n_pix=16)
    assert snr.snr.item() == pytest.approx(0.01 + 0.5 * (1.0 - 0.01))
    assert snr.noise_var.item() == pytest.approx(1.0 + 0.5 * (4.0 - 1.0))
    assert "snr" in snr.state_dict() and "noise_var" in snr.state_dict()
    snr.reset()
    assert snr.snr.item() == pytest.approx(0.01)


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["sawtooth", "cosine", "constant"])
def test_schedule_configs_instantiate(name):
    s = hydra.utils.instantiate(OmegaConf.load(CONF / "schedule" / f"{name}.yaml"))
    assert 0.0 <= s(0) <= 1.0 and 0.0 <= s(60_000) <= 1.0


def test_loss_config_instantiates_with_paper_weights():
    terms = hydra.utils.instantiate(OmegaConf.load(CONF / "loss" / "opusdsd.yaml"))
    assert set(terms) == {"reconstruction", "kl", "disentanglement", "tv", "l1"}
    assert terms["kl"].weight == 2.0 and terms["tv"].weight == 1.0 and terms["l1"].weight == 0.3
    assert terms["disentanglement"].k_intra == 4 and terms["disentanglement"].n_samples == 12800
