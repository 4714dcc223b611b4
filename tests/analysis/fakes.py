"""A tiny analytic "model" and run directory for analysis tests (no training needed).

The decoder maps ``z`` to a Gaussian blob whose x position is ``z[0]`` (Å) on a 16^3 template
of 2 Å voxels; the original data is 32 px at 1 Å, so maps are resampled 16 -> 32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

TEMPLATE, VOXEL = 16, 2.0
BOX, APIX = 32, 1.0


def blob(x_angstrom: float, size: int, apix: float, sigma: float = 3.0) -> torch.Tensor:
    """A Gaussian blob at (x, 0, 0) Å on a ``size``^3 grid centred at index ``size // 2``."""
    r = (torch.arange(size, dtype=torch.float32) - size // 2) * apix
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    return torch.exp(-((xx - x_angstrom) ** 2 + yy**2 + zz**2) / (2 * sigma**2))


class FakeModel(torch.nn.Module):
    latent_dim = 2

    def __init__(self, **data_info) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode(self, batch):
        b = batch["image"].shape[0]
        return {"z_mu": torch.zeros(b, 2), "z_logstd": torch.zeros(b, 2)}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] == 0:
            return blob(0.0, TEMPLATE, VOXEL)[None].expand(len(z), -1, -1, -1) * self.scale
        return torch.stack([blob(float(x), TEMPLATE, VOXEL) for x in z[:, 0]]) * self.scale

    def template_voxel_size(self) -> float:
        return VOXEL


STATES = np.array([-6.0, 0.0, 6.0])  # blob x position (Å) of each true state


def make_run_dir(root: Path, n_per_state: int = 40, seed: int = 0) -> tuple[Path, dict]:
    """A complete run dir with latents clustered by state, plus truth files in ``root``."""
    rng = np.random.default_rng(seed)
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "latents").mkdir()
    (run / "logs" / "csv").mkdir(parents=True)
    labels = np.repeat(np.arange(len(STATES)), n_per_state)
    z = np.stack([STATES[labels], np.zeros(len(labels))], 1) + rng.normal(0, 0.3, (len(labels), 2))
    np.save(run / "latents" / "z_mu.npy", z.astype(np.float32))
    cfg = {
        "model": {"_target_": "tests.analysis.fakes.FakeModel"},
        "data": {
            "_target_": "hetero.data.datamodule.ParticleDataModule",
            "particles": str(write_particles(root / "data", len(labels), seed)),
            "invert_contrast": False, "sampler": "random", "num_workers": 0,
            "norm_sample_size": 50, "split_file": str(run / "split.npz"),
        },
    }
    OmegaConf.save(OmegaConf.create(cfg), run / "config_resolved.yaml")
    info = {"n_particles": len(labels), "n_train": len(labels), "n_val": 0, "original_box": BOX,
            "original_apix": APIX, "box_size": TEMPLATE, "apix": VOXEL, "has_poses": True,
            "has_ctf": False}
    (run / "data_info.json").write_text(json.dumps(info))
    torch.save({"state_dict": FakeModel().state_dict()}, run / "checkpoints" / "best.ckpt")
    rows = ["epoch,step,train/loss,val/loss"]
    for step in range(10):
        rows.append(f"0,{step},{1.0 / (step + 1)},")
    rows.append("0,9,,0.2")
    (run / "logs" / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    truth = {"labels": root / "labels.npy", "volumes": []}
    np.save(truth["labels"], labels)
    import mrcfile

    for i, x in enumerate(STATES):
        path = root / f"state_{i}.mrc"
        with mrcfile.new(path) as mrc:
            mrc.set_data(blob(float(x), BOX, APIX).numpy())
            mrc.voxel_size = APIX
        truth["volumes"].append(path)
    return run, truth


def write_particles(folder: Path, n: int, seed: int = 0) -> Path:
    """A real RELION 3.1 star + stack of ``n`` small noise images with poses and CTF, so the
    analysis writes (and the tests reopen) real particle subsets."""
    from hetero.data.io import write_stack, write_star
    from hetero.data.particles import ParticleTable
    from hetero.physics.rotations import random_rotations

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stack = write_stack(folder / "particles.mrcs", rng.standard_normal((n, 8, 8)).astype(np.float32), 4.0)
    ctf = np.tile([15000.0, 14000.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0], (n, 1))
    table = ParticleTable(
        image_paths=[str(stack)] * n, image_indices=np.arange(n), box_size=8,
        pixel_size_angstrom=4.0, ctf=ctf, origins_px=rng.uniform(-1, 1, (n, 2)),
        rotations=random_rotations(n, generator=torch.Generator().manual_seed(seed)).double().numpy(),
    )
    return write_star(folder / "particles.star", table)
