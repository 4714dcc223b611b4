"""Inference pass shared by training and analysis: encode every particle, in input order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hetero.utils.files import write_npy


@torch.no_grad()
def encode_particles(model, dataloader, device=None, progress: bool = True) -> dict[str, np.ndarray]:
    """Run ``model.encode`` over a dataloader; rows are placed by ``batch["index"]``.

    :return: ``{"z_mu": (N, Z), "z_logstd": (N, Z)}`` float32, ``N`` = largest index + 1.
    """
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    iterator = dataloader
    if progress:
        from rich.progress import track

        iterator = track(dataloader, description="Encoding particles", total=len(dataloader))
    for batch in iterator:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = model.encode(batch)
        chunks.append(
            (
                batch["index"].cpu().numpy(),
                out["z_mu"].float().cpu().numpy(),
                out["z_logstd"].float().cpu().numpy(),
            )
        )
    index = np.concatenate([c[0] for c in chunks])
    n = int(index.max()) + 1 if index.size else 0
    zdim = chunks[0][1].shape[1] if chunks else 0
    z_mu = np.zeros((n, zdim), np.float32)
    z_logstd = np.zeros((n, zdim), np.float32)
    z_mu[index] = np.concatenate([c[1] for c in chunks])
    z_logstd[index] = np.concatenate([c[2] for c in chunks])
    return {"z_mu": z_mu, "z_logstd": z_logstd}


def write_latents(folder: Path, latents: dict[str, np.ndarray], model=None) -> None:
    """Write ``z_mu.npy``, ``z_logstd.npy`` and the model's ``extra_outputs()`` atomically."""
    folder = Path(folder)
    for name, array in latents.items():
        write_npy(folder / f"{name}.npy", array)
    extras = getattr(model, "extra_outputs", None)
    if callable(extras):
        for name, array in extras().items():
            write_npy(folder / f"{name}.npy", np.asarray(array))
