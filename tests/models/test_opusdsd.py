"""OPUS-DSD model: shapes, geometry of the spatial transformer and renderer, memory bank,
neighbour poses, a Lightning fast_dev_run with checkpointing, and bf16 autocast."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from hetero.losses import SawtoothSchedule
from hetero.models.opusdsd import (
    ImageEncoder,
    MemoryBank,
    OpusDSD,
    VolumeDecoder,
    neighbour_rotations,
)
from hetero.models.opusdsd.poses import HEALPIX_NSIDE16_DEG
from hetero.physics.ctf import CTF_COLUMNS, ctf_table_compute
from hetero.physics.projection import centered_grid_3d, project_real, render, rotate_volume
from hetero.physics.rotations import geodesic_distance_deg, random_rotations, viewing_direction
from hetero.utils.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"
NARROW = dict(encoder_channels=[4, 8, 8], decoder_channels=[16, 8, 8, 4], fc_width=32, decoder_fc_width=32)


def blob_volume(size: int, centre_px, sigma: float = 1.5) -> torch.Tensor:
    grid = centered_grid_3d(size)
    d2 = ((grid - torch.tensor(centre_px, dtype=torch.float32)) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * sigma**2))


def ctf_table(n: int, box: int, apix: float) -> torch.Tensor:
    cols = dict(
        defocus_u_angstrom=15000.0, defocus_v_angstrom=14000.0, defocus_angle_deg=30.0, voltage_kv=300.0,
        spherical_aberration_mm=2.7, amplitude_contrast=0.1, phase_shift_deg=0.0, b_factor=0.0, scale=1.0,
    )
    return torch.tensor([[cols[c] for c in CTF_COLUMNS]] * n)


def make_batches(n: int, box: int, batch_size: int, apix: float = 5.0, seed: int = 0, n_classes: int = 3):
    """Batch-contract dicts: two blob 'states' rendered with CTF, shifts and noise."""
    g = torch.Generator().manual_seed(seed)
    states = [blob_volume(box, (3, 0, 0)) + blob_volume(box, (-3, 2, 0)), blob_volume(box, (0, -4, 2))]
    rot = random_rotations(n, generator=g).float()
    origin = torch.randn(n, 2, generator=g)
    ctf = ctf_table(n, box, apix)
    labels = torch.arange(n) % 2
    images = torch.empty(n, box, box)
    for s, vol in enumerate(states):
        sel = labels == s
        images[sel] = render(vol, rot[sel], shifts_px=-origin[sel], ctf=ctf_table_compute(ctf[sel], box, apix))
    images = images / images.std() + 0.5 * torch.randn(n, box, box, generator=g)
    items = [
        dict(image=images[i], rotation=rot[i], origin_px=origin[i], ctf=ctf[i], apix=torch.tensor(apix),
             index=torch.tensor(i), half=torch.tensor(i % 2), pose_class=torch.tensor(i % n_classes))
        for i in range(n)
    ]
    return DataLoader(items, batch_size=batch_size, shuffle=False)


def tiny_model(box=24, template=16, n_particles=64, **kw) -> OpusDSD:
    return OpusDSD(box_size=box, apix=5.0, template_size=template, n_particles=n_particles, **{**NARROW, **kw})


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("box,template", [(24, 16), (24, 20), (32, 32), (32, 20)])
def test_shapes_and_backward(box, template):
    torch.manual_seed(0)
    model = tiny_model(box, template)
    batch = next(iter(make_batches(8, box, 8)))
    enc = model.encode(batch)
    assert enc["z_mu"].shape == (8, 8) and enc["z_logstd"].shape == (8, 8)
    assert model.decode(torch.randn(3, 8)).shape == (3, template, template, template)
    out = model._training_losses(batch)
    assert torch.isfinite(out["total"])
    out["total"].backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert model.encoder.mu.weight.grad.abs().sum() > 0
    assert model.latent_dim == 8


def test_default_widths_geometry():
    enc = ImageEncoder(64, zdim=8)  # 64 -> 32 -> 16 -> 8, resample 12 -> 6 -> 3 -> 1
    assert enc.flat == 1024
    dec = VolumeDecoder(8, 192)  # reference: 16^3 -> 12^3 before the last four upsamplings
    assert dec.mid_size == 12 and dec.out_size == 192
    dec = VolumeDecoder(8, 20, channels=[8, 8, 4, 4])
    assert dec(torch.randn(2, 8)).shape == (2, 20, 20, 20)


# ----------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("with_ctf", [False, True])
@pytest.mark.parametrize("method", ["real", "fourier"])
def test_renderer_matches_project_real_at_T_equal_D(method, with_ctf):
    """The model's renderer against :func:`physics.render` (real-space projection, then the CTF
    on the image grid), with no CTF (an all-zero CTF row means none) and with a real one
    (astigmatic, phase shift, B-factor, scale), so the renderer's CTF path is pinned too."""
    box = 20
    model = tiny_model(box=box, template=box)
    model.renderer.method = method
    vols = torch.stack([blob_volume(box, (2, 1, -3)), blob_volume(box, (-1, 0, 2))])
    rot = random_rotations(2, generator=torch.Generator().manual_seed(1)).float()
    poses = neighbour_rotations(rot, 2, 10.0)
    ctf = torch.zeros(2, 9)
    if with_ctf:
        ctf = torch.tensor([[9000.0, 8000.0, 30.0, 300.0, 2.7, 0.1, 20.0, 40.0, 0.9],
                            [15000.0, 14500.0, -70.0, 200.0, 2.0, 0.07, 0.0, 0.0, 1.1]])
    batch = dict(ctf=ctf, apix=torch.full((2,), 5.0))
    images = model.render(vols, poses, batch)
    assert images.shape == (2, 3, box, box)
    for b in range(2):
        table = ctf[b].expand(3, 9)
        ctf_grid = ctf_table_compute(table, box, batch["apix"][b].expand(3)) if with_ctf else None
        expected = render(vols[b], poses[b], ctf=ctf_grid)
        if method == "real":
            torch.testing.assert_close(images[b], expected, atol=1e-5, rtol=1e-5)
        else:  # both are interpolations; they agree to a few per cent of the signal
            assert float((images[b] - expected).norm() / expected.norm()) < 0.08
        if with_ctf:  # the CTF matters: without it the images differ grossly
            plain = project_real(vols[b], poses[b])
            assert float((images[b] - plain).norm() / plain.norm()) > 0.3


def test_encoder_backprojection_puts_mass_at_blob():
    """Extruding projections of a blob and rotating them back (sampling at A r) makes the
    summed pseudo-volume peak at the blob's position in the volume frame."""
    size = 24
    centre = (4, -3, 2)  # (x, y, z) px
    vol = blob_volume(size, centre)
    rot = random_rotations(6, generator=torch.Generator().manual_seed(3)).float()
    images = project_real(vol, rot)
    enc = ImageEncoder(size, channels=[4], fc_width=4)
    back = enc.backproject(images, rot)
    summed = back.sum(0)
    z, y, x = [int(i) for i in torch.unravel_index(summed.argmax(), summed.shape)]
    assert (x - size // 2, y - size // 2, z - size // 2) == centre
    # Each single view has its maximum on the ray through the blob: at the blob position the
    # pseudo-volume equals the image maximum (up to interpolation of the narrow peak).
    at_blob = back[:, centre[2] + size // 2, centre[1] + size // 2, centre[0] + size // 2]
    torch.testing.assert_close(at_blob, images.amax((-2, -1)), atol=0.1 * images.max().item(), rtol=0)  # bilinear


def test_backprojection_equals_extrude_and_rotate():
    size = 16
    enc = ImageEncoder(size, channels=[4], fc_width=4)
    images = torch.randn(3, size, size)
    rot = random_rotations(3, generator=torch.Generator().manual_seed(5)).float()
    extruded = images[:, None].expand(3, size, size, size)
    explicit = rotate_volume(extruded, rot.transpose(1, 2))  # V(A r)
    # Inside the sphere (away from the last voxel of the extruded box) the two agree.
    inside = centered_grid_3d(size).norm(dim=-1) <= size / 2 - 1
    torch.testing.assert_close(enc.backproject(images, rot)[:, inside], explicit[:, inside], atol=1e-4, rtol=1e-4)


def test_neighbour_poses():
    rot = random_rotations(4, generator=torch.Generator().manual_seed(0)).float()
    poses = neighbour_rotations(rot, 8, HEALPIX_NSIDE16_DEG)
    assert poses.shape == (4, 9, 3, 3)
    torch.testing.assert_close(poses[:, 0], rot)
    angles = geodesic_distance_deg(rot[:, None], poses[:, 1:])
    torch.testing.assert_close(angles, torch.full((4, 8), HEALPIX_NSIDE16_DEG), atol=1e-2, rtol=0)
    # tilts move the viewing direction by the spread
    cos = (viewing_direction(rot)[:, None] * viewing_direction(poses[:, 1:])).sum(-1).clamp(-1, 1)
    torch.testing.assert_close(torch.rad2deg(torch.acos(cos)), angles, atol=2e-2, rtol=0)
    assert neighbour_rotations(rot, 8, 3.0, include_consensus=False).shape == (4, 8, 3, 3)
    rnd = neighbour_rotations(rot, 5, 3.0, mode="random")
    torch.testing.assert_close(geodesic_distance_deg(rot[:, None], rnd[:, 1:]), torch.full((4, 5), 3.0), atol=1e-2, rtol=0)
    assert abs(HEALPIX_NSIDE16_DEG - 3.66) < 0.01


# ----------------------------------------------------------------------------- memory bank
def test_memory_bank_momentum_and_first_visit():
    bank = MemoryBank(5, 2, momentum=0.7)
    bank.update(torch.tensor([1, 3]), torch.ones(2, 2), torch.tensor([4, 5]))
    torch.testing.assert_close(bank.codes[1], torch.ones(2))  # first visit copies
    bank.update(torch.tensor([1]), torch.zeros(1, 2))
    torch.testing.assert_close(bank.codes[1], torch.full((2,), 0.7))
    assert bank.seen.tolist() == [False, True, False, True, False]
    assert bank.classes.tolist() == [-1, 4, -1, 5, -1]
    codes, classes = bank.sample(100)
    assert codes.shape == (2, 2) and sorted(classes.tolist()) == [4, 5]
    # Reference behaviour: momentum from the random init; duplicates keep the first row.
    ref = MemoryBank(3, 1, momentum=0.7, first_visit_copy=False)
    start = ref.codes.clone()
    ref.update(torch.tensor([2, 2]), torch.tensor([[1.0], [5.0]]))
    torch.testing.assert_close(ref.codes[2], 0.7 * start[2] + 0.3)
    assert {"bank.codes", "bank.classes", "bank.seen"} <= set(tiny_model().state_dict())


def test_bank_gather_over_ranks(monkeypatch):
    """Uneven per-rank batches are padded, gathered and unpadded in rank order."""
    model = tiny_model(n_particles=10)
    # What rank 1 contributes, in the order _gather_rows gathers: size, index, mu, class.
    remote = [torch.tensor([3]), torch.tensor([7, 8, 9]), torch.full((3, 8), 2.0), torch.tensor([1, 1, 1])]

    def fake_all_gather(t):
        r = remote.pop(0).to(t.dtype)
        r = torch.cat([r, r.new_zeros((t.shape[0] - r.shape[0], *t.shape[1:]))])
        return torch.stack([t, r])

    monkeypatch.setattr(model, "_world_size", lambda: 2)
    monkeypatch.setattr(model, "all_gather", fake_all_gather)
    batch = {"index": torch.tensor([0, 1]), "pose_class": torch.tensor([3, 4])}
    assert model._update_bank(batch, torch.ones(2, 8)) == 5
    assert model.bank.seen.nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    torch.testing.assert_close(model.bank.codes[8], torch.full((8,), 2.0))
    assert model.bank.classes[[0, 1, 7]].tolist() == [3, 4, 1]


# ----------------------------------------------------------------------------- Lightning
def test_fast_dev_run_and_checkpoint(tmp_path):
    L.seed_everything(0)
    model = tiny_model(box=24, template=16, n_particles=32, kl_schedule=SawtoothSchedule())
    loader = make_batches(32, 24, 8)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, loader, loader)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for key in ("reconstruction", "kl", "disentanglement", "tv", "l1"):
        assert f"train/loss/{key}" in trainer.callback_metrics
    assert int(model.images_seen) == 24 and int(model.bank.seen.sum()) == 24
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["state_dict"]["bank.codes"].shape == (32, 8)
    assert ckpt["hyper_parameters"]["encoder_channels"] == [4, 8, 8]
    fresh = tiny_model(box=24, template=16, n_particles=32)
    fresh.load_state_dict(ckpt["state_dict"])
    torch.testing.assert_close(fresh.bank.codes, model.bank.codes)
    extras = model.extra_outputs()
    assert extras["memory_bank"].shape == (32, 8) and extras["memory_bank_seen"].sum() == 24
    preds = trainer.predict(model, loader)
    assert preds[0]["z_mu"].shape == (8, 8)

    dev = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                    enable_model_summary=False)
    dev.fit(tiny_model(box=24, template=16, n_particles=32), loader, loader)


def test_bf16_autocast_step():
    torch.manual_seed(0)
    model = tiny_model()
    batch = next(iter(make_batches(8, 24, 8)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model._training_losses(batch)
    assert out["total"].dtype == torch.float32 and torch.isfinite(out["total"])
    out["total"].backward()


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_validation_and_options():
    model = tiny_model(update_bank_on_val=True, n_neighbour_poses=0, include_consensus=True, augment=False,
                       recon_mask_radius=0.9, loss={"reconstruction": None, "kl": None})
    batch = next(iter(make_batches(8, 24, 8)))
    out = model._training_losses(batch)
    assert set(out) - {"_logs"} == {"reconstruction", "total"}
    model.validation_step(batch, 0)
    assert int(model.bank.seen.sum()) == 8


def test_model_config_instantiates():
    cfg = OmegaConf.load(CONF / "model" / "opusdsd.yaml")
    del cfg["defaults"]
    cfg.loss = OmegaConf.load(CONF / "loss" / "opusdsd.yaml")
    cfg.kl_schedule = OmegaConf.load(CONF / "schedule" / "sawtooth.yaml")
    cfg.optimizer = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4}
    cfg.scheduler = None
    cfg.encoder_channels, cfg.decoder_channels = [4, 8, 8], [16, 8, 8, 4]
    model = hydra.utils.instantiate(
        cfg, n_particles=40, n_train=36, n_val=4, original_box=32, original_apix=5.0, box_size=24,
        apix=6.67, has_poses=True, has_ctf=True,
    )
    assert isinstance(model.kl_schedule, SawtoothSchedule)
    assert model.term("disentanglement").k_inter == 128
    assert model.bank.codes.shape == (40, 8)
    assert math.isclose(model.neighbour_spread_deg, 3.66)
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam)


def test_encoder_log_sigma_is_bounded_so_its_exp_cannot_overflow():
    """An encoder overfitted at lr 1e-3 gave log sigma 39 for a sharpened input (300 particles,
    epoch 25 of `model=opusdsd_cpu`) and exp(2 x 39) overflowed the gradient: the default bound
    keeps the step finite; unbounded (the paper's network) the same encoder gives a non-finite
    loss. The bound leaves an encoder that stays below it unchanged."""
    batch = next(iter(make_batches(8, 24, 8)))
    for bound in (2.0, None):
        torch.manual_seed(0)
        model = tiny_model(encoder_logstd_max=bound)
        healthy = model.encode(batch)["z_logstd"]
        assert healthy.max() < 0.5  # far below the bound: the clamp does not act
        with torch.no_grad():
            model.encoder.logstd.bias.fill_(60.0)
        out = model._training_losses(batch)
        if bound is None:
            assert not torch.isfinite(out["total"])
            continue
        assert torch.all(model.encode(batch)["z_logstd"] == bound)
        assert torch.isfinite(out["total"])
        out["total"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for bad in (math.inf, "abc", True, -1.0):
        with pytest.raises(ConfigError, match="model.encoder_logstd_max must be a finite number >= 0"):
            tiny_model(encoder_logstd_max=bad)
