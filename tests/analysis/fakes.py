"""A tiny analytic "model", a real tiny particle dataset and run directories for analysis tests.

The decoder maps ``z`` to a Gaussian blob whose x position is ``z[0]`` (Å) on a 16^3 template
of 2 Å voxels; the original data is 32 px at 1 Å, so maps are resampled 16 -> 32. The
particle images (RELION 3.1 star + mrcs written with hetero's own writers, no CTF) are exact
projections of blobs at x = -6, 0, 6 Å (three true states) at random poses and shifts, plus
a little white noise, so the data module, reconstructions and subsets run for real.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

TEMPLATE, VOXEL = 16, 2.0
BOX, APIX = 32, 1.0
SIGMA = 3.0
STATES = np.array([-6.0, 0.0, 6.0])  # blob x position (Å) of each true state


def blob(x_angstrom: float, size: int, apix: float, sigma: float = SIGMA) -> torch.Tensor:
    """A Gaussian blob at (x, 0, 0) Å on a ``size``^3 grid centred at index ``size // 2``."""
    r = (torch.arange(size, dtype=torch.float32) - size // 2) * apix
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    return torch.exp(-((xx - x_angstrom) ** 2 + yy**2 + zz**2) / (2 * sigma**2))


def blob_projections(
    x_angstrom: np.ndarray, rotations: np.ndarray, shifts_px: np.ndarray
) -> np.ndarray:
    """Exact projections (line integrals, Å) of unit blobs at ``(x, 0, 0)`` seen at RELION
    ``rotations`` ``(N, 3, 3)``, translated by ``shifts_px`` ``(N, 2)``: ``(N, BOX, BOX)``."""
    centre = np.einsum(
        "nij,nj->ni", rotations, np.stack([x_angstrom, 0 * x_angstrom, 0 * x_angstrom], 1)
    )
    centre = centre[:, :2] / APIX + shifts_px
    axis = np.arange(BOX) - BOX // 2
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    d2 = (xx[None] - centre[:, 0, None, None]) ** 2 + (yy[None] - centre[:, 1, None, None]) ** 2
    s = SIGMA / APIX
    return (math.sqrt(2 * math.pi) * SIGMA * np.exp(-d2 / (2 * s**2))).astype(np.float32)


class FakeModel(torch.nn.Module):
    """The analysis interface of :class:`hetero.models.base.HeteroModel`, analytically."""

    latent_dim = 2
    method = "fake"
    embedding_key = "z_mu"
    embedding_name = "z"
    labels_key = None
    label_name = None
    can_decode = True

    def __init__(self, **data_info) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def predict_step(self, batch, batch_idx=0):
        b = batch["image"].shape[0]
        z = torch.stack([batch["image"].float().mean((-2, -1)), torch.zeros(b)], 1)
        return {"index": batch["index"], "z_mu": z, "z_logstd": torch.zeros(b, 2)}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] == 0:
            return blob(0.0, TEMPLATE, VOXEL)[None].expand(len(z), -1, -1, -1) * self.scale
        return torch.stack([blob(float(x), TEMPLATE, VOXEL) for x in z[:, 0]]) * self.scale

    def template_voxel_size(self) -> float:
        return VOXEL

    def state_maps(self):
        return None

    @classmethod
    def default_manifest(cls) -> dict:
        return {
            "method": cls.method,
            "result_loader": "hetero.analysis.result.load_model_result",
            "parts": {"model": {"kind": "checkpoint", "path": "checkpoints/best.ckpt"}},
            "analysis_steps": [],
        }


def write_particles(folder: Path, labels: np.ndarray, seed: int = 0, noise: float = 0.5) -> Path:
    """A RELION 3.1 star + mrcs of blob projections (state ``labels[i]`` for particle ``i``)."""
    from hetero.data.io.mrc import write_stack
    from hetero.data.io.star import write_star
    from hetero.data.particles import ParticleTable
    from hetero.physics.rotations import random_rotations

    rng = np.random.default_rng(seed)
    n = len(labels)
    rot = random_rotations(n, generator=torch.Generator().manual_seed(seed)).double().numpy()
    origins = rng.normal(0, 1.0, (n, 2))
    images = blob_projections(STATES[labels], rot, -origins) + rng.normal(
        0, noise, (n, BOX, BOX)
    ).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    stack = write_stack(folder / "particles.mrcs", images, APIX)
    table = ParticleTable(
        image_paths=np.full(n, str(stack.resolve()), dtype=object),
        image_indices=np.arange(n),
        box_size=BOX,
        pixel_size_angstrom=np.full(n, APIX),
        rotations=rot,
        origins_px=origins,
        half_set=(rng.permutation(n) % 2).astype(np.int8),
        source="fake",
    )
    return write_star(folder / "particles.star", table)


def make_run_dir(
    root: Path, n_per_state: int = 40, seed: int = 0, write_latents: bool = True
) -> tuple[Path, dict]:
    """A complete run dir (manifest, config, checkpoint, keyed latents clustered by state, real
    particle files) plus truth files in ``root``."""
    from hetero.analysis.latents import CheckpointId
    from hetero.analysis.latents import write_latents as write_keyed
    from hetero.utils.manifest import run_manifest, write_manifest

    rng = np.random.default_rng(seed)
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "logs" / "csv").mkdir(parents=True)
    labels = np.repeat(np.arange(len(STATES)), n_per_state)
    star = write_particles(root / "data", labels, seed)
    cfg = {
        "model": {"_target_": "tests.analysis.fakes.FakeModel"},
        "data": {
            "_target_": "hetero.data.datamodule.ParticleDataModule",
            "particles": str(star),
            "box_size": TEMPLATE,
            "batch_size": 16,
            "num_workers": 0,
            "persistent_workers": False,
            "sampler": "random",
            "val_fraction": 0.1,
            "norm_sample_size": 50,
            "split_file": str(run / "split.npz"),
        },
    }
    OmegaConf.save(OmegaConf.create(cfg), run / "config_resolved.yaml")
    info = {
        "n_particles": len(labels),
        "n_train": len(labels),
        "n_val": 0,
        "original_box": BOX,
        "original_apix": APIX,
        "box_size": TEMPLATE,
        "apix": VOXEL,
        "has_poses": True,
        "has_ctf": False,
    }
    (run / "data_info.json").write_text(json.dumps(info))
    ckpt = run / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": FakeModel().state_dict()}, ckpt)
    latents = None
    if write_latents:
        z = np.stack([STATES[labels], np.zeros(len(labels))], 1) + rng.normal(
            0, 0.3, (len(labels), 2)
        )
        folder = write_keyed(run / "latents", CheckpointId.of(ckpt), {"z_mu": z.astype(np.float32)})
        latents = folder.relative_to(run)
    write_manifest(
        run, run_manifest(FakeModel.default_manifest(), "checkpoints/best.ckpt", latents)
    )
    rows = ["epoch,step,train/loss,val/loss"]
    for step in range(10):
        rows.append(f"0,{step},{1.0 / (step + 1)},")
    rows.append("0,9,,0.2")
    (run / "logs" / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    truth = {"labels": root / "labels.npy", "volumes": []}
    np.save(truth["labels"], labels)
    from hetero.data.io.mrc import write_volume

    for i, x in enumerate(STATES):
        path = root / f"state_{i}.mrc"
        write_volume(path, blob(float(x), BOX, APIX).numpy(), APIX)
        truth["volumes"].append(path)
    return run, truth


# --------------------------------------------------------------------------------------------
# Contexts for testing analysis steps alone (no run directory, no checkpoint)
# --------------------------------------------------------------------------------------------
class FakeRun:
    """What steps use of a :class:`~hetero.analysis.rundir.RunDir`: geometry, paths, data."""

    def __init__(
        self,
        root: Path,
        box: int = BOX,
        apix: float = APIX,
        train_box: int = TEMPLATE,
        datamodule=None,
    ) -> None:
        self.path = Path(root)
        self.checkpoint = self.path / "checkpoints" / "best.ckpt"
        self.info = {
            "original_box": box,
            "original_apix": apix,
            "box_size": train_box,
            "apix": apix * box / train_box,
        }
        self.manifest = FakeModel.default_manifest()
        self.metrics_csv = self.path / "logs" / "csv" / "metrics.csv"
        self._dm = datamodule

    def datamodule(self, purpose: str = "analysis"):
        if self._dm is None:
            from hetero.analysis.rundir import DataUnavailableError

            raise DataUnavailableError(f"{purpose} needs data; this fake run has none")
        return self._dm


def analyze_config(overrides: list[str] | None = None):
    """``conf/analyze.yaml`` composed with quiet, small settings (``run_dir`` filled in)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    conf = str(Path(__file__).resolve().parents[2] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose(
            config_name="analyze",
            overrides=[
                "run_dir=/nonexistent",
                "progress=false",
                "umap.enabled=false",
                "pca_components=2",
                "n_pc_traversals=1",
                "pc_traversal.steps=3",
                "per_image_fsc_samples=6",
                *(overrides or []),
            ],
        )


def fake_result(embedding: np.ndarray, labels: np.ndarray | None = None, decode: bool = True):
    """An :class:`~hetero.analysis.result.AnalysisResult` of the analytic :class:`FakeModel`."""
    from hetero.analysis.result import AnalysisResult

    model = FakeModel()
    return AnalysisResult(
        method="fake",
        n_particles=len(embedding),
        embedding=np.asarray(embedding, np.float32),
        labels=labels,
        label_name="class" if labels is not None else None,
        decode=(lambda z: model.decode(torch.as_tensor(z))) if decode else None,
        voxel_size=VOXEL,
        provenance={"checkpoint": "fake.ckpt", "latents": "fake-latents/"},
    )


def fake_context(
    tmp_path: Path,
    result,
    overrides: list[str] | None = None,
    datamodule=None,
    truth=None,
    **run_kwargs,
):
    from hetero.analysis.context import AnalysisContext

    ctx = AnalysisContext(
        cfg=analyze_config(overrides),
        run=FakeRun(tmp_path, datamodule=datamodule, **run_kwargs),
        out=tmp_path / "analysis",
        result=result,
    )
    ctx.truth = truth
    return ctx
