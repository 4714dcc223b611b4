"""What a trained run offers analysis: :class:`AnalysisResult`, and the loader for models.

The run manifest names a loader ``loader(run: RunDir, cfg) -> AnalysisResult``
(``result_loader``); :func:`load_model_result` serves every LightningModule model that
implements :class:`hetero.models.base.HeteroModel`'s interface. See
``docs/design/analysis_interface.md``.

Example usage::

    result = load_result(run, cfg)          # the manifest's loader
    validate_result(result)                 # shapes, and no NaN/inf embeddings
    z = result.embedding                    # (N, E) float32, input order
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


class NonFiniteLatentsError(ValueError):
    """Per-particle embeddings hold NaN or inf (they are never passed on to PCA/UMAP/k-means)."""


@dataclass
class AnalysisResult:
    """The per-particle (and per-volume) output of a trained run, in input order.

    :param method: short method name (``homogeneous``, ``opusdsd``, ``class3d``, ...).
    :param n_particles: ``N``.
    :param embedding: ``(N, E)`` float32 points that PCA/UMAP/k-means use (``E = 0``: none).
    :param embedding_name: what they are called (``"z"``, ``"posterior"``).
    :param labels: ``(N,)`` int64 the method's own assignment (``-1``: discarded), or ``None``.
    :param label_name: what a label is called (``"class"``, ``"voted state"``).
    :param label_first: the number label 0 carries in file names and reports (1 for class3d, as
        RELION numbers classes; labels stay 0-based in arrays).
    :param decode: ``(K, E) array -> (K, T, T, T)`` decoded volumes on the template grid, or
        ``None`` if the method cannot decode.
    :param voxel_size: Å per voxel of decoded volumes and :attr:`state_maps`.
    :param state_maps: ``(S, T, T, T)`` maps the method made for its states, or ``None``.
    :param volume_embedding: ``(V, F)`` per-volume points, or ``None``.
    :param volume_counts: ``(V,)`` particles behind each volume, or ``None``.
    :param per_particle: other ``(N, ...)`` arrays.
    :param provenance: checkpoint path and SHA-256, latents folder, manifest parts used.
    :param extras: method-specific objects for the method's own steps (e.g. ``"model"``).
    """

    method: str
    n_particles: int
    embedding: np.ndarray
    embedding_name: str = "z"
    labels: np.ndarray | None = None
    label_name: str | None = None
    label_first: int = 0
    decode: Callable[[np.ndarray], torch.Tensor] | None = None
    voxel_size: float | None = None
    state_maps: torch.Tensor | None = None
    volume_embedding: np.ndarray | None = None
    volume_counts: np.ndarray | None = None
    per_particle: dict[str, np.ndarray] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding_dim(self) -> int:
        return int(self.embedding.shape[1])


def validate_result(result: AnalysisResult) -> None:
    """Check shapes and refuse non-finite embeddings.

    :raises ValueError: a shape does not match ``n_particles``.
    :raises NonFiniteLatentsError: naming the checkpoint, the latents folder and the particles
        (0-based rows in input order) whose embedding holds NaN or inf.
    """
    n = int(result.n_particles)
    emb = np.asarray(result.embedding)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"{result.method}: embedding must be (N={n}, E), got {emb.shape}")
    if result.labels is not None and np.asarray(result.labels).shape != (n,):
        raise ValueError(
            f"{result.method}: labels must be (N={n},), got {np.asarray(result.labels).shape}"
        )
    _check_other_shapes(result, n)
    bad = ~np.isfinite(emb).all(axis=1) if emb.shape[1] else np.zeros(n, bool)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(
            f"{int(i)} ({'NaN' if np.isnan(emb[i]).any() else 'inf'})" for i in rows[:20]
        )
        more = f" and {len(rows) - 20} more" if len(rows) > 20 else ""
        prov = result.provenance
        raise NonFiniteLatentsError(
            f"the {result.embedding_name} embedding of {len(rows)} of {n} particles is not finite, "
            f"so it cannot be clustered: checkpoint {prov.get('checkpoint', '?')} (latents "
            f"{prov.get('latents', '?')}); particle rows (0-based, input order): {shown}{more}. "
            "The model diverged or those images are damaged: check the images "
            "(NaN/inf pixels), analyse an earlier checkpoint (checkpoint=<file>), or retrain."
        )


def _check_other_shapes(result: AnalysisResult, n: int) -> None:
    """``per_particle`` rows, ``state_maps`` and the per-volume arrays (:raises ValueError:)."""
    name = result.method
    for key, value in result.per_particle.items():
        if np.asarray(value).shape[:1] != (n,):
            raise ValueError(
                f"{name}: per_particle[{key!r}] must have N={n} rows, got {np.shape(value)}"
            )
    if result.state_maps is not None and result.state_maps.ndim != 4:
        raise ValueError(
            f"{name}: state_maps must be (S, T, T, T), got {tuple(result.state_maps.shape)}"
        )
    if (result.decode is not None or result.state_maps is not None) and not result.voxel_size:
        raise ValueError(f"{name}: decoded or state maps need voxel_size (Å)")
    if result.volume_embedding is not None:
        vol = np.asarray(result.volume_embedding)
        if vol.ndim != 2:
            raise ValueError(f"{name}: volume_embedding must be (V, F), got {vol.shape}")
        counts = result.volume_counts
        if counts is not None and np.asarray(counts).shape != (len(vol),):
            raise ValueError(
                f"{name}: volume_counts must be (V={len(vol)},), got {np.shape(counts)}"
            )


def load_result(run, cfg) -> AnalysisResult:
    """Call the loader the run's manifest names (``result_loader``)."""
    import hydra

    path = run.manifest["result_loader"]
    loader = hydra.utils.get_method(path)
    result = loader(run, cfg)
    if not isinstance(result, AnalysisResult):
        raise TypeError(
            f"result_loader {path} returned {type(result).__name__}, not AnalysisResult"
        )
    return result


def load_model_result(run, cfg) -> AnalysisResult:
    """The generic loader: rebuild the model from the run's config and checkpoint, take the
    per-particle arrays of the inference pass for that checkpoint (computing them when absent
    or when ``cfg.recompute_latents``), and fill the fields from the model's interface."""
    device = str(cfg.maps.get("device", "cpu"))
    model = run.load_model(device)
    arrays, folder, ckpt = particle_arrays(run, model, cfg)
    key = model.embedding_key
    if key not in arrays:
        raise KeyError(
            f"{type(model).__name__}.embedding_key={key!r} is not among the predicted arrays "
            f"{sorted(arrays)} in {folder}"
        )
    embedding = np.asarray(arrays[key], dtype=np.float32)
    n = int(embedding.shape[0])
    labels_key = getattr(model, "labels_key", None)
    labels = np.asarray(arrays[labels_key], dtype=np.int64).reshape(-1) if labels_key else None
    can_decode = bool(getattr(model, "can_decode", True))

    def decode(points: np.ndarray) -> torch.Tensor:
        z = torch.as_tensor(np.asarray(points, dtype=np.float32))
        with torch.no_grad():
            return model.decode(z.to(model.device)).float().cpu()

    state_maps = model.state_maps() if hasattr(model, "state_maps") else None
    return AnalysisResult(
        method=str(run.manifest["method"]),
        n_particles=n,
        embedding=embedding,
        embedding_name=str(getattr(model, "embedding_name", "z")),
        labels=labels,
        label_name=getattr(model, "label_name", None) if labels_key else None,
        label_first=int(getattr(model, "label_first", 0)),
        decode=decode if can_decode else None,
        voxel_size=float(model.template_voxel_size()),
        state_maps=None if state_maps is None else state_maps.detach().float().cpu(),
        per_particle={k: v for k, v in arrays.items() if k not in (key, labels_key)},
        provenance={
            "checkpoint": str(ckpt.path),
            "checkpoint_sha256": ckpt.sha256,
            "latents": str(folder),
            "manifest_parts": sorted(run.manifest.get("parts", {})),
        },
        extras={"model": model},
    )


def particle_arrays(run, model, cfg) -> tuple[dict[str, np.ndarray], Path, Any]:
    """The inference-pass arrays of ``run.checkpoint``: reused from the analysis output or the
    run's ``latents/`` only when recorded for the same checkpoint (SHA-256), else computed
    with the run's data and written under ``<output_dir>/latents/`` (never into the run).

    :return: ``(arrays, folder, CheckpointId)``.
    """
    from hetero.analysis.inference import predict_particles
    from hetero.analysis.latents import CheckpointId, read_latents, write_latents

    ckpt = CheckpointId.of(run.checkpoint)
    own = Path(str(cfg.output_dir)) / "latents"
    candidates = [own / ckpt.key]
    recorded = run.part_path("latents")
    if recorded is not None:
        candidates.append(recorded)
    candidates.append(run.path / "latents" / ckpt.key)
    if not cfg.get("recompute_latents"):
        for folder in dict.fromkeys(candidates):
            arrays = read_latents(folder, ckpt)
            if arrays is not None:
                log.info(f"Latents of {ckpt.path.name} (sha256 {ckpt.sha256[:12]}) from {folder}")
                return arrays, folder, ckpt
        if (run.path / "latents" / "z_mu.npy").is_file():
            log.info(
                f"{run.path / 'latents'} holds latents that record no checkpoint (made before "
                "latents were keyed by checkpoint): not reused"
            )
        log.info(
            f"No latents recorded for {ckpt.path.name} (sha256 {ckpt.sha256[:12]}): running the "
            "inference pass"
        )
    dm = run.datamodule("computing the latents of the checkpoint")
    device = str(cfg.maps.get("device", "cpu"))
    arrays = predict_particles(
        model, dm.predict_dataloader(shard=False), device, progress=bool(cfg.progress)
    )
    model.to(device).eval()
    folder = write_latents(
        own, ckpt, arrays, particles=getattr(dm, "particles_path", None), written_by="analyze"
    )
    log.info(f"Latents of {len(next(iter(arrays.values())))} particles -> {folder}")
    return arrays, folder, ckpt
