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
        "data": {"_target_": "tests.analysis.fakes.no_data"},
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


def no_data():
    raise FileNotFoundError("fake run: no particle data")
