"""DynaMight model pieces: decoder and encoder, consensus seeding and fit, map resampling, the
schedule and update rate, the latent-space alignment, decode units against the renderer, and
bf16 autocast (lambda calibration and the KL weight: test_dynamight_loss_weights.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from hetero.data.io.errors import InputError
from hetero.models.components.renderer import Renderer
from hetero.models.dynamight import (
    DeformationDecoder,
    DynaMight,
    DynaMightSchedule,
    GaussianConsensus,
    HalfSetEncoder,
    positional_encoding,
    update_rate_check,
)
from hetero.models.dynamight import alignment as A
from hetero.models.dynamight import epoch as E
from hetero.models.dynamight.initialization import resample_map
from hetero.physics.ctf import CTF_COLUMNS
from hetero.physics.gaussians import project_gaussians, rasterize_gaussians
from hetero.physics.rotations import random_rotations


def make_batch(b: int, box: int, apix: float, seed: int = 0, half=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ctf = dict(defocus_u_angstrom=15000.0, defocus_v_angstrom=14000.0, defocus_angle_deg=30.0, voltage_kv=300.0,
               spherical_aberration_mm=2.7, amplitude_contrast=0.1, phase_shift_deg=0.0, b_factor=0.0, scale=1.0)
    return {
        "image": torch.randn(b, box, box, generator=g),
        "rotation": random_rotations(b, g).float(),
        "origin_px": torch.randn(b, 2, generator=g),
        "ctf": torch.tensor([[ctf[c] for c in CTF_COLUMNS]] * b),
        "apix": torch.full((b,), apix),
        "index": torch.arange(b),
        "half": torch.arange(b) % 2 if half is None else torch.full((b,), half),
        "pose_class": torch.zeros(b, dtype=torch.long),
    }


def small_model(**kw) -> DynaMight:
    args = dict(box_size=16, apix=4.0, n_gaussians=40, n_particles=64, zdim=3, decoder_layers=2,
                decoder_width=8, encoder_hidden=[16, 8])
    args.update(kw)
    torch.manual_seed(0)
    m = DynaMight(**args)
    for vae in m.halves:
        with torch.no_grad():
            vae.consensus.positions.copy_((torch.rand(vae.consensus.n_gaussians, 3) - 0.5) * 0.5)
    return m


def test_decoder_starts_at_zero_and_encodes_positions():
    dec = DeformationDecoder(zdim=4, box_size=64, n_frequencies=10, n_layers=3, width=16)
    coords = torch.rand(50, 3) - 0.5
    assert torch.all(dec(torch.randn(5, 4), coords) == 0)  # zero-initialised last layer
    pe = positional_encoding(coords, 64, 10)
    assert pe.shape == (50, 60)
    # Per coordinate: sin at L frequencies from D/2 = 32 rad per box down to 1, then all cosines.
    torch.testing.assert_close(pe[:, 0], torch.sin(32 * coords[:, 0]))
    torch.testing.assert_close(pe[:, 9], torch.sin(coords[:, 0]))
    torch.testing.assert_close(pe[:, 10], torch.sin(32 * coords[:, 1]))
    torch.testing.assert_close(pe[:, 30], torch.cos(32 * coords[:, 0]))
    # Per-particle coordinates give the same field.
    torch.nn.init.normal_(dec.out.weight)
    z = torch.randn(2, 4)
    torch.testing.assert_close(dec(z, coords), dec(z, coords.expand(2, -1, -1)))


def test_decoder_random_last_layer_option():
    """model.decoder_out_init_std: N(0, std^2) last layer, so the displacements depend on z
    (and the data term reaches the encoder) from the first step; 0 keeps the zeros."""
    coords = torch.rand(50, 3) - 0.5
    torch.manual_seed(0)
    dec = DeformationDecoder(zdim=4, box_size=64, n_layers=3, width=16, out_init_std=0.1)
    w = dec.out.weight
    assert torch.all(w != 0) and 0.02 < float(w.std()) < 0.3
    z = torch.randn(2, 4)
    d = dec(z, coords)
    assert float((d[0] - d[1]).abs().max()) > 0
    z.requires_grad_(True)
    dec(z, coords).sum().backward()
    assert float(z.grad.abs().max()) > 0
    with pytest.raises(ValueError, match="out_init_std"):
        DeformationDecoder(zdim=4, box_size=64, out_init_std=-1.0)


def test_decoder_unit_hidden_init_keeps_the_activation_scale():
    """model.decoder_hidden_init=unit: through the reference's 8 x 32 hidden layers the body's
    output keeps the scale of its input (within ~3x); PyTorch's default init (reference) shrinks
    it ~100x or more, and z's influence with it."""
    coords = torch.rand(500, 3) - 0.5
    z = torch.randn(16, 6)
    spread = {}
    for init in ("reference", "unit"):
        torch.manual_seed(0)
        dec = DeformationDecoder(zdim=6, box_size=64, hidden_init=init)
        h = dec.coord_in(positional_encoding(coords, 64, dec.n_frequencies))[None] + dec.latent_in(z)[:, None]
        x = h
        for layer in list(dec.body)[:-2]:          # the 8 hidden W x W layers
            x = layer(x)
        spread[init] = float(x.std() / h.std())
    assert spread["unit"] > 0.3 and spread["reference"] < 0.02, spread
    with pytest.raises(ValueError, match="hidden_init"):
        DeformationDecoder(zdim=4, box_size=64, hidden_init="xavier")


def test_encoder_logstd_init_option():
    """model.encoder_logstd_init sets the log-sigma head's bias; null keeps PyTorch's default
    init (uniform, never exactly the constant)."""
    m = small_model(encoder_logstd_init=-3.0)
    for vae in m.halves:
        torch.testing.assert_close(vae.encoder.logstd.bias, torch.full((3,), -3.0))
    with torch.no_grad():
        m.halves[0].encoder.logstd.weight.zero_()
    _, logstd = m.halves[0].encoder(torch.randn(2, 16, 16))
    torch.testing.assert_close(logstd, torch.full((2, 3), -3.0))
    assert not torch.all(small_model().halves[0].encoder.logstd.bias == -3.0)


def test_encoder_lowpass_removes_frequencies_beyond_the_cut():
    """model.encoder_lowpass: the encoder sees the image low-passed (a pattern beyond the cut
    vanishes, one inside it stays); a cut beyond Nyquist is refused."""
    box, apix = 16, 4.0
    m = small_model(encoder_lowpass=16.0, particle_diameter=box * apix * 2)  # mask ~ 1 inside
    plain = small_model(particle_diameter=box * apix * 2)
    yy = torch.arange(box, dtype=torch.float32)[:, None].expand(box, box)
    batch = make_batch(2, box, apix)
    batch["origin_px"] = torch.zeros(2, 2)
    batch["image"] = torch.stack([torch.cos(2 * math.pi * 6 * yy / box),   # 10.7 Å: cut
                                  torch.cos(2 * math.pi * 2 * yy / box)])  # 32 Å: kept
    enc, ref = m.prepare(batch).encoder_input, plain.prepare(batch).encoder_input
    assert float(enc[0].abs().max()) < 1e-4 * float(ref[0].abs().max())
    torch.testing.assert_close(enc[1], ref[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="encoder_lowpass"):
        small_model(encoder_lowpass=6.0)


def test_encoder_shapes_and_activation_choice():
    enc = HalfSetEncoder(32, 6, final_activation="tanh")
    mu, logstd = enc(torch.randn(3, 32, 32))
    assert mu.shape == logstd.shape == (3, 6)
    assert isinstance(enc.body[-1], torch.nn.Tanh)
    assert isinstance(HalfSetEncoder(32, 6).body[-1], torch.nn.ReLU)
    with pytest.raises(ValueError):
        HalfSetEncoder(32, 6, final_activation="gelu")


def test_consensus_seeding_and_fit():
    box, apix = 24, 4.0
    truth = torch.tensor([[10.0, 0.0, -8.0], [-12.0, 6.0, 4.0], [0.0, -10.0, 10.0]])
    target = rasterize_gaussians(truth, 6.0, torch.ones(3), box, apix)
    c = GaussianConsensus(200, box, apix, initial_width_px=1.0)
    threshold = c.seed(target, generator=torch.Generator().manual_seed(0))
    pos = c.positions_angstrom().detach()
    # Every seed lies in a voxel above the threshold (99th percentile).
    idx = (pos / apix).round().long() + box // 2
    assert torch.all(target[idx[:, 2], idx[:, 1], idx[:, 0]] > threshold - 1e-6)
    res = c.fit(target, steps=30, lr=0.02)
    assert res["fit_residual"] < res["scale_residual"] < 1.0
    # Stage 1 is the least-squares scale: its residual is below that of any other scale.
    c2 = GaussianConsensus(200, box, apix, initial_width_px=1.0)
    c2.seed(target, generator=torch.Generator().manual_seed(0))
    r0 = c2.fit(target, steps=0)["scale_residual"]
    with torch.no_grad():
        for f in (0.9, 1.1):
            c2.log_amplitude.add_(math.log(f))
            r = float(((c2.rasterize(box) - target) ** 2).sum() / (target**2).sum())
            c2.log_amplitude.sub_(math.log(f))
            assert r > r0
    with pytest.raises(ValueError, match="initial_threshold"):
        c.seed(target, threshold=1e9)


def test_resample_map_keeps_physical_positions():
    """A map at another box and pixel size lands on the training grid at the same Å."""
    r = torch.tensor([[9.0, -6.0, 12.0]])
    src = rasterize_gaussians(r, 5.0, torch.ones(1), 50, 1.7)       # 85 Å
    out = resample_map(src.numpy(), 1.7, 24, 3.0, 60.0)               # 72 Å training box
    ref = rasterize_gaussians(r, 5.0, torch.ones(1), 24, 3.0)
    corr = torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1]
    assert corr > 0.99
    assert float(out.max()) == pytest.approx(float(ref.max()), rel=0.1)
    with pytest.raises(InputError, match="spans 10 x 1.7 Å = 17.0 Å"):
        resample_map(src[:10, :10, :10].numpy(), 1.7, 24, 3.0, 60.0, source="small.mrc")
    with pytest.raises(InputError, match="no voxel size"):
        resample_map(src.numpy(), 0.0, 24, 3.0, 60.0)


def test_reference_schedule_and_update_rate():
    s = DynaMightSchedule()
    assert [s.phase(e) for e in (0, 2, 3, 12)] == ["warmup", "warmup", "main", "main"]
    assert [e for e in range(70) if s.phase(e) == "position"] == [*range(30, 38), *range(60, 68)]
    assert s.phase(31, frozen=True) == "main"
    assert [e for e in range(80) if s.reestimates_consensus(e)] == [15, 45, 75]
    assert not s.whitening_active(13) and s.whitening_active(14)
    assert not s.calibrates(3) and s.calibrates(4)
    assert s.check_every(5000) == 10 and s.check_every(10**6) == 1
    assert s.stop_epoch(150) == 200
    rate, hist, fails = 1.0, [], 0
    for loss in (5.0, 4.0, 3.0):          # improving: never fails
        rate, hist, fails = update_rate_check(rate, hist, fails, loss)
    assert (rate, fails) == (1.0, 0) and hist == [4.0, 3.0]
    rate, hist, fails = update_rate_check(rate, hist, fails, 3.6)   # first failure: no decay
    assert (rate, fails) == (1.0, 1)
    rate, hist, fails = update_rate_check(rate, hist, fails, 3.7)   # second in a row: x 0.95
    assert rate == pytest.approx(0.95) and fails == 2
    rate, _, _ = update_rate_check(0.104, [1.0, 1.0], 5, 2.0)       # below the floor -> 0
    assert rate == 0.0


def test_decode_matches_the_renderer_on_the_template_grid():
    """decode(z) on a T-grid, projected by the shared Renderer (which integrates in template
    voxels), equals the Gaussian renderer on the training box."""
    m = small_model(box_size=24, template_size=16, n_gaussians=30)
    for vae in m.halves:
        torch.nn.init.normal_(vae.decoder.out.weight, std=0.05)
    z = torch.randn(2, 3)
    vols = m.decode(z)
    assert vols.shape == (2, 16, 16, 16)
    vae = m.halves[0]
    positions, _ = vae.deformed(z)
    rot = random_rotations(2, torch.Generator().manual_seed(1)).float()
    c = vae.consensus
    direct = project_gaussians(c.positions_angstrom(positions).detach(), c.sigma_angstrom().detach(),
                               c.amplitudes().detach(), rot, 24, 4.0)
    via_map = Renderer(24, 16, "real")(vols, rot, None, torch.full((2,), 4.0))
    corr = torch.corrcoef(torch.stack([direct.flatten(), via_map.flatten()]))[0, 1]
    assert corr > 0.97
    assert float(via_map.sum() / direct.sum()) == pytest.approx(1.0, rel=0.05)


def test_alignment_recovers_an_affine_map_between_latent_spaces():
    m = small_model()
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(200, 3, generator=g)
    M = torch.randn(3, 3, generator=g)
    b = torch.randn(3, generator=g)
    z2 = (z1 - b) @ torch.linalg.inv(M)          # half 2 sees z1 through an affine change
    m.align_stats.zero_()
    A.accumulate_alignment(m, z2, z1)
    r2 = A.solve_alignment(m)
    assert r2 == pytest.approx(1.0, abs=1e-5)
    mapped = torch.cat([z2, torch.ones(200, 1)], 1) @ m.latent_map
    torch.testing.assert_close(mapped, z1, atol=1e-3, rtol=1e-3)


def test_predict_outputs_and_bf16_autocast():
    m = small_model()
    batch = make_batch(6, 16, 4.0)
    out = m.predict_step(batch)
    assert set(out) >= {"index", "z_mu", "z_logstd", "z_mu_half1", "z_mu_half2", "half",
                        "deformation_rmsd", "deformation_max"}
    # Half-1 particles: z_mu is their own encoder's; half-2: mapped (identity map at start).
    torch.testing.assert_close(out["z_mu"][0], out["z_mu_half1"][0])
    torch.testing.assert_close(out["z_mu"][1], out["z_mu_half2"][1])
    assert torch.all(out["deformation_rmsd"] == 0)  # zero-initialised decoder
    prep = m.prepare(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = m.halves[0].losses(prep, True, None, 1e-4, m.regularizer, m.regularizer.graph(
            m.halves[0].consensus.positions_angstrom().detach()), 1.0)
    assert res["predicted"].dtype == torch.complex64 and res["data"].dtype == torch.float32
    assert torch.isfinite(res["total"])


def test_consensus_from_a_user_map_at_another_box(tmp_path):
    """model.consensus_map: a 40-px map at 2.5 Å/px seeds and fits both half sets' Gaussians
    in the 16-px, 4 Å/px training box; a map too small for the particle is refused."""
    from hetero.data.io.mrc import write_volume
    from hetero.models.dynamight.initialization import initialize_consensus

    centre = torch.tensor([[8.0, -4.0, 6.0]])
    vol = rasterize_gaussians(centre, 6.0, torch.ones(1), 40, 2.5)
    write_volume(tmp_path / "map.mrc", vol.numpy(), 2.5)
    m = small_model(consensus_map=str(tmp_path / "map.mrc"), fit_steps=5)
    initialize_consensus(m)
    assert bool(m.initialized)
    for vae in m.halves:
        pos = vae.consensus.positions_angstrom().detach()
        assert float((pos - centre).norm(dim=1).max()) < 12.0  # all seeds in the blob
    write_volume(tmp_path / "small.mrc", vol[:8, :8, :8].numpy(), 2.5)
    m = small_model(consensus_map=str(tmp_path / "small.mrc"))
    with pytest.raises(InputError, match="small.mrc"):
        initialize_consensus(m)


def test_update_rates_decay_freeze_and_set_the_stop_epoch():
    """check_update_rates over epochs: failing checks decay a half's rate, a rate below the floor
    freezes it, epoch n_epochs freezes both, and the frozen epoch sets when training stops."""
    sched = DynaMightSchedule(n_warmup_epochs=0, n_epochs=50, check_particles=1)
    m = SimpleNamespace(
        schedule=sched, n_particles=10, update_rate=torch.ones(2), epoch_loss=torch.zeros(2, 2),
        loss_history=torch.full((2, 2), float("nan")), check_failures=torch.zeros(2, dtype=torch.long),
        frozen_epoch=torch.tensor(-1), cfg={"update_decay": 0.5, "update_floor": 0.3},
    )
    losses = {0: [5, 4, 3, 3.5, 3.6, 3.7, 3.8], 1: [5, 4, 3, 2, 1, 0.5, 0.4]}
    for p in range(7):
        for h in (0, 1):
            m.epoch_loss[h] = torch.tensor([losses[h][p] * 10.0, 10.0])
        E.check_update_rates(m, p)
    # Half set 1 fails at epochs 4, 5, 6: x0.5 from the 2nd failure on, 0.25 < floor -> 0.
    assert float(m.update_rate[0]) == 0.0 and float(m.update_rate[1]) == 1.0
    assert int(m.frozen_epoch) == -1
    E.check_update_rates(m, 50)  # after n_epochs: both frozen
    assert float(m.update_rate.max()) == 0.0 and int(m.frozen_epoch) == 51
    assert sched.stop_epoch(51) == 68


def test_shared_width_option():
    c = GaussianConsensus(10, 16, 4.0, initial_width_px=1.5, shared_width=True)
    assert c.log_sigma.shape == (1,) and c.sigma_px().shape == (10,)
    assert torch.allclose(c.sigma_px(), torch.full((10,), 1.5))
    assert GaussianConsensus(10, 16, 4.0).log_sigma.shape == (10,)


def test_the_documented_commands_compose(tmp_path):
    """The issue's two commands: the built-in data with nothing else (consensus reconstructed
    from the particles), and a user's refinement + consensus map on 4 GPUs with DDP, bf16."""
    from tests.helpers import compose_train

    cfg = compose_train(tmp_path, ["model=dynamight"])
    assert cfg.model._target_ == "hetero.models.dynamight.DynaMight" and cfg.model.consensus_map is None
    assert cfg.data.sampler == "random"  # shuffled batches, as the reference
    cfg = compose_train(tmp_path, [
        "model=dynamight", "data=custom", "data.particles=run_data.star",
        "model.consensus_map=run_class001.mrc", "trainer=ddp", "trainer.devices=4"], tiny_synthetic=False)
    assert cfg.model.consensus_map == "run_class001.mrc" and cfg.data.particles == "run_data.star"
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.precision) == ("ddp", 4, "bf16-mixed")
    assert cfg.model.n_gaussians == 10000 and cfg.model.zdim == 6
    assert cfg.loss.regularization_factor == 0.9 and cfg.model.scheduler is None
