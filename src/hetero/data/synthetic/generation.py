"""Writing a :class:`~hetero.data.synthetic.simulate.SyntheticDataset` into a folder.

:func:`write_dataset` draws the per-particle parameters (:func:`draw_parameters`), renders the
noiseless images in a first pass (their pooled variance sets the noise level of the target
SNR), scales them and adds the noise in a second pass, then writes the stack, the star file, the
state maps, ``truth.npz`` and ``truth.json`` (last: it marks a complete folder). The image model
and the files are described in :mod:`hetero.data.synthetic.simulate`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from hetero.data.particles import ParticleTable
from hetero.data.synthetic.molecule import PseudoAtomMolecule, rasterize
from hetero.data.synthetic.simulate import (
    GENERATOR_VERSION,
    MASK_THRESHOLD,
    STACK_NAME,
    STAR_NAME,
    SyntheticDataset,
)
from hetero.physics.rotations import random_rotations

__all__ = ["draw_parameters", "write_dataset"]


def draw_parameters(ds: SyntheticDataset) -> dict:
    """All per-particle random parameters of ``ds`` (independent seeded streams); the noise
    generator is under ``"_rng_noise"``."""
    n, k = ds.n_particles, ds.n_states
    streams = np.random.SeedSequence([ds.seed, 0x53594E]).spawn(6)
    rng_state, rng_pose, rng_ctf, rng_shift, rng_half, rng_noise = (np.random.default_rng(s) for s in streams)
    out: dict = {}
    if ds.kind == "continuous":
        t = rng_state.uniform(0.0, 1.0, n)
        out["t"] = t
        out["labels"] = np.minimum((t * k).astype(np.int64), k - 1)
    else:
        out["labels"] = rng_state.permutation(np.arange(n) % k).astype(np.int64)
    gen = torch.Generator().manual_seed(int(rng_pose.integers(2**62)))
    out["rotations"] = random_rotations(n, generator=gen, dtype=torch.float64).numpy()
    mean_df = rng_ctf.uniform(ds.defocus_min_angstrom, ds.defocus_max_angstrom, n)
    astig = rng_ctf.uniform(0.0, ds.astigmatism_max_angstrom, n)
    out["defocus_u_angstrom"] = mean_df + astig / 2
    out["defocus_v_angstrom"] = mean_df - astig / 2
    out["defocus_angle_deg"] = rng_ctf.uniform(0.0, 180.0, n)
    out["b_factor"] = rng_ctf.uniform(ds.b_factor_min, ds.b_factor_max, n)
    out["shifts_px"] = rng_shift.normal(0.0, ds.shift_sigma_px, (n, 2))
    out["origins_px"] = -out["shifts_px"]
    half = np.zeros(n, dtype=np.int8)
    half[rng_half.permutation(n)[n // 2 :]] = 1
    out["half_set"] = half
    out["_rng_noise"] = rng_noise
    return out


def write_dataset(ds: SyntheticDataset, folder: Path, mol: PseudoAtomMolecule, states: tuple) -> None:
    """Write ``ds`` into ``folder`` (which must exist); ``states`` is ``ds.states(mol)``."""
    from hetero.data.io.mrc import write_stack

    coords, weights, info, t_grid = states
    truth = draw_parameters(ds)
    rng_noise = truth.pop("_rng_noise")
    images, stats = _clean_pass(ds, truth, mol)
    noise = _noise_level(ds, stats)
    _add_noise(ds, images, noise, rng_noise)
    truth.update(_signal_truth(ds, stats, noise))
    if t_grid is not None:
        truth["t_grid"] = t_grid

    # Files: stack, star, volumes, truth (truth.json last: it marks a complete folder).
    stack = (folder / STACK_NAME).resolve()
    write_stack(stack, images, ds.pixel_size_angstrom)
    del images
    _write_star(ds, folder, stack, truth)
    counts = _write_volumes(ds, folder, coords, weights, info, truth["labels"])
    np.savez(folder / "truth.npz", **truth)
    summary = _summary(ds, info, counts, t_grid, noise, stats, mol)
    (folder / "truth.json").write_text(json.dumps(summary, indent=2) + "\n")


def _clean_pass(ds: SyntheticDataset, truth: dict, mol: PseudoAtomMolecule):
    """Pass 1: clean images ``(N, D, D)`` float32 and their statistics ``(N, 5)``: sum, sum of
    squares (box); sum, sum of squares, count (footprint)."""
    n, d = ds.n_particles, ds.box_size
    images = np.empty((n, d, d), dtype=np.float32)
    stats = np.zeros((n, 5))  # sum, sum of squares (box); sum, sum of squares, count (footprint)
    with torch.inference_mode():
        for start in range(0, n, ds.chunk_size):
            idx = np.arange(start, min(n, start + ds.chunk_size))
            clean, foot = ds.clean_images(truth, idx, mol)
            c64, f64 = clean.double(), foot.double()
            stats[idx, 0] = c64.sum((-2, -1)).numpy()
            stats[idx, 1] = (c64 * c64).sum((-2, -1)).numpy()
            stats[idx, 2] = (c64 * f64).sum((-2, -1)).numpy()
            stats[idx, 3] = (c64 * c64 * f64).sum((-2, -1)).numpy()
            stats[idx, 4] = f64.sum((-2, -1)).numpy()
            images[idx] = clean.numpy()
    return images, stats


def _noise_level(ds: SyntheticDataset, stats: np.ndarray) -> dict:
    """Pooled signal variances (box, footprint) -> ``sigma``, ``scale``, ``noise_sigma`` and the
    SNRs the written images have."""
    n, d = ds.n_particles, ds.box_size
    npix = n * d * d
    var_box = stats[:, 1].sum() / npix - (stats[:, 0].sum() / npix) ** 2
    count = stats[:, 4].sum()
    var_mask = stats[:, 3].sum() / count - (stats[:, 2].sum() / count) ** 2
    if ds.snr is None:
        sigma, scale, noise_sigma = math.sqrt(var_box), 1.0 / math.sqrt(var_box), 0.0
    else:
        sigma = math.sqrt(var_box / ds.snr)
        scale, noise_sigma = 1.0 / sigma, 1.0
    snr_box = var_box / sigma**2 if noise_sigma else math.inf
    snr_masked = var_mask / sigma**2 if noise_sigma else math.inf
    return {"scale": scale, "noise_sigma": noise_sigma, "snr_box": snr_box, "snr_masked": snr_masked}


def _add_noise(ds: SyntheticDataset, images: np.ndarray, noise: dict, rng_noise) -> None:
    """Pass 2: scale to unit noise and add white noise (one sequential stream: chunk-free)."""
    n, d = ds.n_particles, ds.box_size
    scale, noise_sigma = noise["scale"], noise["noise_sigma"]
    for start in range(0, n, ds.chunk_size):
        stop = min(n, start + ds.chunk_size)
        images[start:stop] *= np.float32(scale)
        if noise_sigma:
            images[start:stop] += rng_noise.standard_normal((stop - start, d, d), dtype=np.float32)


def _signal_truth(ds: SyntheticDataset, stats: np.ndarray, noise: dict) -> dict:
    """The signal and noise entries of ``truth.npz`` (per particle and global)."""
    d, scale = ds.box_size, noise["scale"]
    per_var = (stats[:, 1] / (d * d) - (stats[:, 0] / (d * d)) ** 2) * scale**2
    cnt = np.maximum(stats[:, 4], 1)
    per_var_mask = (stats[:, 3] / cnt - (stats[:, 2] / cnt) ** 2) * scale**2
    return dict(
        signal_var=per_var, signal_var_masked=per_var_mask, mask_fraction=stats[:, 4] / (d * d),
        noise_sigma=np.float64(noise["noise_sigma"]), image_scale=np.float64(scale),
        snr_box=np.float64(noise["snr_box"]), snr_masked=np.float64(noise["snr_masked"]),
        pixel_size_angstrom=np.float64(ds.pixel_size_angstrom), box_size=np.int64(d),
    )


def _write_star(ds: SyntheticDataset, folder: Path, stack: Path, truth: dict) -> None:
    """``particles.star``: poses, origins, CTF (without the B-factor envelope), half sets."""
    from hetero.data.io.star import write_star

    n, d, apix = ds.n_particles, ds.box_size, ds.pixel_size_angstrom
    ctf = np.zeros((n, 9))
    ctf[:, 0] = truth["defocus_u_angstrom"]
    ctf[:, 1] = truth["defocus_v_angstrom"]
    ctf[:, 2] = truth["defocus_angle_deg"]
    ctf[:, 3], ctf[:, 4], ctf[:, 5] = ds.voltage_kv, ds.spherical_aberration_mm, ds.amplitude_contrast
    ctf[:, 8] = 1.0  # phase shift 0, B-factor 0 (the envelope is not given away), scale 1
    table = ParticleTable(
        image_paths=np.full(n, str(stack), dtype=object),
        image_indices=np.arange(n),
        box_size=d,
        pixel_size_angstrom=np.full(n, apix),
        rotations=truth["rotations"],
        origins_px=truth["origins_px"],
        ctf=ctf,
        half_set=truth["half_set"],
        source=f"synthetic {ds.kind} dataset",
    )
    write_star(folder / STAR_NAME, table)


def _write_volumes(ds: SyntheticDataset, folder: Path, coords, weights, info: list, labels) -> np.ndarray:
    """``state_XX.mrc`` of every state; adds ``count`` and ``volume`` to ``info``; returns the
    particle count per state."""
    from hetero.data.io.mrc import write_volume

    d, apix = ds.box_size, ds.pixel_size_angstrom
    counts = np.bincount(labels, minlength=ds.n_states)
    for k in range(ds.n_states):
        vol = rasterize(coords[k], d, apix, ds.atom_sigma_angstrom, weights[k])
        write_volume(folder / f"state_{k:02d}.mrc", vol.numpy(), apix)
        info[k].update(count=int(counts[k]), volume=f"state_{k:02d}.mrc")
    return counts


def _summary(ds: SyntheticDataset, info, counts, t_grid, noise: dict, stats, mol) -> dict:
    """The human-readable ``truth.json``."""
    d = ds.box_size
    return {
        "kind": ds.kind,
        "n_particles": ds.n_particles,
        "box_size": d,
        "pixel_size_angstrom": ds.pixel_size_angstrom,
        "n_states": ds.n_states,
        "snr_target": ds.snr,
        "snr_box": _finite_or_none(noise["snr_box"]),
        "snr_masked": _finite_or_none(noise["snr_masked"]),
        "mask_fraction_mean": float(stats[:, 4].mean() / (d * d)),
        "noise_sigma": noise["noise_sigma"],
        "image_scale": noise["scale"],
        "n_atoms": int(mol.n_atoms),
        "states": info,
        "counts": counts.tolist(),
        "t_grid": None if t_grid is None else t_grid.tolist(),
        "files": {"star": STAR_NAME, "stack": STACK_NAME, "truth": "truth.npz"},
        "snr_definitions": {
            "snr_box": "pooled variance of the noiseless CTF-modulated images over the whole "
            "box and all particles / noise variance",
            "snr_masked": "the same over the particle footprint (CTF-free projection > "
            f"{MASK_THRESHOLD} x its maximum) / noise variance",
        },
        "image_model": "image = image_scale * translate(CTF(incl. B envelope) * project(state "
        "volume), -origin) + N(0, noise_sigma^2)",
        "generator_version": GENERATOR_VERSION,
        "params": ds.params,
    }


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
