"""The training task's inference pass: latents of the kept checkpoint, keyed by that checkpoint.

The pass itself is :func:`hetero.analysis.inference.predict_particles` (shared with analysis,
which may not import tasks); the folder layout is :mod:`hetero.analysis.latents`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hetero.analysis.inference import predict_particles
from hetero.analysis.latents import CheckpointId, write_latents


def encode_particles(
    model, dataloader, device=None, progress: bool = True
) -> dict[str, np.ndarray]:
    """Every array ``model.predict_step`` returns (``z_mu``, ``z_logstd``, ...), ``(N, ...)`` in
    input order, plus the model's ``extra_outputs()``."""
    return predict_particles(model, dataloader, device, progress)


def write_run_latents(
    run_dir: str | Path,
    checkpoint: str | Path,
    arrays: dict[str, np.ndarray],
    particles: str | None = None,
) -> Path:
    """Write ``arrays`` to ``<run_dir>/latents/<checkpoint stem>-<sha256[:12]>/`` (atomic).

    :return: the folder, relative to ``run_dir`` when inside it.
    """
    folder = write_latents(
        Path(run_dir) / "latents",
        CheckpointId.of(checkpoint),
        arrays,
        particles=particles,
        written_by="train",
    )
    try:
        return folder.relative_to(Path(run_dir))
    except ValueError:
        return folder
