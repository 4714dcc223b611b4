"""DynaMight-specific analysis outputs as pure functions: arrays in, files / numbers out.

Coordinates: Gaussian positions are Å from the box centre (the voxel at index ``D // 2``, see
:mod:`hetero.physics.conventions`); maps written by the analysis have origin 0 and voxel size
``apix`` at the original box, so ChimeraX places voxel ``i`` at ``i * apix`` and a position
``r`` at ``r + (box // 2) * apix`` (:func:`chimerax_coordinates`).

- :func:`write_markers` / :func:`write_pdb`: pseudo-atoms as a ChimeraX marker file (``.cmm``)
  and a PDB (values in the B-factor column, ``color bfactor``);
- :func:`pc_displacements`, :func:`centre_displacements`: per-Gaussian displacements along
  principal components and between cluster centres;
- :func:`deformation_summary`: mean / max RMSD of the deformations over the data set (Å);
- :func:`half_set_disagreement`: the half sets' disagreement per Gaussian (the paper's error
  estimate), written as a value map (:func:`write_value_map`) with a ChimeraX script that
  colours the consensus map by it (:func:`write_color_by_map_script`) and a figure;
- :func:`write_marker_series`: marker series along a path with a ``.cxc`` movie script.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hetero.utils.files import write_text

#: Chain identifiers used for PDB files with more than 9999 pseudo-atoms.
CHAINS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def chimerax_coordinates(positions_angstrom: np.ndarray, box_size: int, apix: float) -> np.ndarray:
    """Positions (Å from the box centre) in the frame of a map written with origin 0."""
    return np.asarray(positions_angstrom, dtype=np.float64) + (int(box_size) // 2) * float(apix)


def value_colors(values: np.ndarray, vmin: float | None = None, vmax: float | None = None,
                 cmap: str = "viridis") -> np.ndarray:
    """``(N,)`` values -> ``(N, 3)`` RGB in ``[0, 1]`` (matplotlib colour map)."""
    import matplotlib

    v = np.asarray(values, dtype=np.float64)
    lo = float(np.nanmin(v)) if vmin is None else float(vmin)
    hi = float(np.nanmax(v)) if vmax is None else float(vmax)
    t = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)
    return np.asarray(matplotlib.colormaps[cmap](t))[:, :3]


def write_markers(path: str | Path, positions: np.ndarray, radius: float | np.ndarray = 2.0,
                  colors: np.ndarray | None = None, name: str = "gaussians") -> Path:
    """A ChimeraX/Chimera marker file: one marker per ``(N, 3)`` position (ChimeraX frame, Å).

    :param radius: scalar or ``(N,)`` marker radii (Å). :param colors: ``(N, 3)`` RGB in [0, 1].
    """
    pos = np.asarray(positions, dtype=np.float64)
    rad = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(pos),))
    rgb = np.full((len(pos), 3), (1.0, 0.8, 0.2)) if colors is None else np.asarray(colors, dtype=np.float64)
    lines = [f'<marker_set name="{name}">']
    for i, ((x, y, z), r, (cr, cg, cb)) in enumerate(zip(pos, rad, rgb), start=1):
        lines.append(f'<marker id="{i}" x="{x:.3f}" y="{y:.3f}" z="{z:.3f}" '
                     f'r="{cr:.3f}" g="{cg:.3f}" b="{cb:.3f}" radius="{r:.3f}"/>')
    lines.append("</marker_set>")
    return write_text(path, "\n".join(lines) + "\n")


def write_pdb(path: str | Path, positions: np.ndarray, bfactors: np.ndarray | None = None,
              occupancies: np.ndarray | None = None, title: str = "hetero DynaMight pseudo-atoms") -> Path:
    """Pseudo-atoms as PDB ``HETATM`` records (element C, residue ``GAU``), ChimeraX frame (Å).

    Residue numbers restart in a new chain every 9999 atoms; serials wrap at 99999 (readers
    use the record order). ``bfactors`` (e.g. disagreement in Å) are clipped to the column's
    ``[0, 999.99]`` range.
    """
    pos = np.asarray(positions, dtype=np.float64)
    n = len(pos)
    if n > 9999 * len(CHAINS):
        raise ValueError(f"{n} pseudo-atoms do not fit the PDB format ({9999 * len(CHAINS)} at most)")
    b = np.zeros(n) if bfactors is None else np.clip(np.asarray(bfactors, dtype=np.float64), 0, 999.99)
    occ = np.ones(n) if occupancies is None else np.clip(np.asarray(occupancies, dtype=np.float64), 0, 9.99)
    lines = [f"REMARK   1 {title}"]
    for i in range(n):
        chain, resi = CHAINS[i // 9999], i % 9999 + 1
        x, y, z = pos[i]
        lines.append(f"HETATM{(i + 1) % 100000:5d}  C   GAU {chain}{resi:4d}    "
                     f"{x:8.3f}{y:8.3f}{z:8.3f}{occ[i]:6.2f}{b[i]:6.2f}           C")
    lines.append("END")
    return write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Displacements
# ----------------------------------------------------------------------------------------------


def pc_displacements(deform: Callable[[np.ndarray], np.ndarray], mean: np.ndarray,
                     components: np.ndarray, scales: np.ndarray, n_sigma: float = 2.0) -> np.ndarray:
    """Per-Gaussian displacement between ``mean - n_sigma s_k u_k`` and ``mean + n_sigma s_k u_k``
    for each principal component ``u_k`` (``s_k`` its standard deviation).

    :param deform: ``(M, Z)`` latents -> ``(M, N, 3)`` deformed positions (Å).
    :return: ``(K, N, 3)`` displacements (Å).
    """
    comps = np.asarray(components, dtype=np.float32)
    s = np.asarray(scales, dtype=np.float32)[:, None] * float(n_sigma)
    ends = np.concatenate([mean - s * comps, mean + s * comps]).astype(np.float32)
    pos = deform(ends)
    k = len(comps)
    return pos[k:] - pos[:k]


def centre_displacements(deform: Callable[[np.ndarray], np.ndarray], centres: np.ndarray,
                         consensus: np.ndarray) -> dict[str, np.ndarray]:
    """Deformed positions at cluster centres and how they differ.

    :return: ``positions`` ``(K, N, 3)``, ``from_consensus`` ``(K, N, 3)`` (Å) and ``rmsd``
        ``(K, K)`` pairwise RMS distance between the centres' Gaussians (Å).
    """
    pos = np.asarray(deform(np.asarray(centres, dtype=np.float32)), dtype=np.float64)
    diff = pos[:, None] - pos[None]
    rmsd = np.sqrt((diff**2).sum(-1).mean(-1))
    return {"positions": pos, "from_consensus": pos - np.asarray(consensus)[None], "rmsd": rmsd}


def deformation_summary(rmsd: np.ndarray, largest: np.ndarray | None = None) -> dict[str, float]:
    """Deformation magnitude over the data set from per-particle RMSDs to the consensus (Å)
    (the reference viewer prints the mean and the maximum)."""
    r = np.asarray(rmsd, dtype=np.float64)
    out = {"mean_rmsd": float(r.mean()), "max_rmsd": float(r.max()), "median_rmsd": float(np.median(r)),
           "p95_rmsd": float(np.percentile(r, 95))}
    if largest is not None:
        out["max_displacement"] = float(np.max(largest))
    return out


def half_set_disagreement(displacement_a: np.ndarray, displacement_b: np.ndarray) -> dict[str, np.ndarray]:
    """Per-Gaussian disagreement of the two half sets' deformations of the same particles.

    :param displacement_a, displacement_b: ``(V, N, 3)`` displacements (Å) of ``V`` validation
        particles at the same ``N`` points, each half set with its own latent of the particle.
    :return: ``rms_difference`` ``(N,)`` (Å), ``rms_displacement`` ``(N,)`` (mean of the two
        halves' RMS displacement, Å) and ``relative`` = their ratio.
    """
    a = np.asarray(displacement_a, dtype=np.float64)
    b = np.asarray(displacement_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"displacement arrays differ: {a.shape} vs {b.shape}")
    diff = np.sqrt(((a - b) ** 2).sum(-1).mean(0))
    mag = 0.5 * (np.sqrt((a**2).sum(-1).mean(0)) + np.sqrt((b**2).sum(-1).mean(0)))
    return {"rms_difference": diff, "rms_displacement": mag, "relative": diff / np.maximum(mag, 1e-6)}


# ----------------------------------------------------------------------------------------------
# Maps coloured by values, series and movies
# ----------------------------------------------------------------------------------------------


def value_map(positions: np.ndarray, values: np.ndarray, sigma: float, box_size: int, apix: float) -> np.ndarray:
    """A ``(D, D, D)`` map carrying each Gaussian's value: ``sum_j v_j G_j / sum_j G_j`` (``G_j``
    a Gaussian of ``sigma`` Å at position ``j``, Å from the centre); 0 far from every Gaussian."""
    import torch

    from hetero.physics.gaussians import rasterize_gaussians

    pos = torch.as_tensor(np.asarray(positions), dtype=torch.float32)
    v = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    num = rasterize_gaussians(pos, sigma, v, box_size, apix)
    den = rasterize_gaussians(pos, sigma, torch.ones_like(v), box_size, apix)
    return torch.where(den > 1e-3, num / den.clamp(min=1e-3), 0.0).numpy()


def write_value_map(path: str | Path, positions: np.ndarray, values: np.ndarray, sigma: float,
                    box_size: int, apix: float) -> Path:
    from hetero.data.io.mrc import write_volume

    return write_volume(path, value_map(positions, values, sigma, box_size, apix), apix)


def write_color_by_map_script(path: str | Path, density: str | Path, values: str | Path,
                              level: float, vmin: float, vmax: float, palette: str = "bluered",
                              markers: str | Path | None = None) -> Path:
    """``.cxc``: open ``density`` and colour its surface by the ``values`` map (``color sample``),
    with a colour key; optionally also open a marker file. Paths relative to the script."""
    def rel(p):
        p = Path(p)
        try:
            return str(p.relative_to(Path(path).parent))
        except ValueError:
            return str(p.resolve())

    lines = [
        "# hetero DynaMight: surface coloured by a per-Gaussian value; run from this folder",
        f"open {rel(density)}",
        f"open {rel(values)}",
        "volume #2 hide",
        f"volume #1 style surface level {level:.6g}",
        f"color sample #1 map #2 palette {palette} range {vmin:.4g},{vmax:.4g}",
        f"key {palette} :{vmin:.3g} :{vmax:.3g} pos 0.05,0.05 size 0.3,0.04",
        "view",
    ]
    if markers is not None:
        lines.insert(3, f"open {rel(markers)}")
    return write_text(path, "\n".join(lines) + "\n")


def write_marker_series(folder: str | Path, positions: np.ndarray, prefix: str,
                        colors: np.ndarray | None = None, radius: float = 2.0,
                        movie: str | None = None) -> list[Path]:
    """``(F, N, 3)`` positions (ChimeraX frame) -> ``<prefix>_000.cmm`` ... plus ``<prefix>.cxc``
    that opens them and plays them as a model series (``mseries``), recording ``movie`` (an
    ``.mp4`` name) if given. Returns the marker files and the script (last)."""
    folder = Path(folder)
    frames = np.asarray(positions)
    width = max(3, len(str(len(frames) - 1)))
    paths = []
    for i, pos in enumerate(frames):
        c = None if colors is None else np.asarray(colors)[i] if np.asarray(colors).ndim == 3 else colors
        paths.append(write_markers(folder / f"{prefix}_{i:0{width}d}.cmm", pos, radius, c, f"{prefix} {i}"))
    n = len(paths)
    lines = [f"# {n} marker frames written by hetero (DynaMight); run from this folder",
             f"open {' '.join(p.name for p in paths)}", "view"]
    play = f"mseries #1-{n} pauseFrames 5"
    if movie:
        lines += ["movie record", play, f"wait {5 * n}", f"movie encode {movie}"]
    else:
        lines.append(play + " loop 3")
    paths.append(write_text(folder / f"{prefix}.cxc", "\n".join(lines) + "\n"))
    return paths


def write_map_movie_script(path: str | Path, maps: Sequence[str | Path], level: float,
                           movie: str, color: str = "#b2b2ff") -> Path:
    """``.cxc`` opening ``maps`` as a volume series and recording one oscillation to ``movie``."""
    folder = Path(path).parent
    names = [str(Path(m).relative_to(folder)) if Path(m).is_relative_to(folder) else str(Path(m).resolve())
             for m in maps]
    n = len(names)
    lines = [f"# {n} maps written by hetero (DynaMight); run from this folder",
             f"open {' '.join(names)} vseries true",
             f"volume #1 style surface level {level:.6g} color {color}", "view", "movie record",
             "vseries play #1 loop false direction oscillate maxFrameRate 5",
             f"wait {10 * n}", f"movie encode {movie}"]
    return write_text(path, "\n".join(lines) + "\n")


def disagreement_figure(path: str | Path, positions: np.ndarray, disagreement: np.ndarray,
                        displacement: np.ndarray) -> Path:
    """Report figure: histogram of the per-Gaussian half-set disagreement, disagreement vs
    displacement, and the Gaussians projected along z coloured by disagreement (PNG)."""
    from hetero.analysis.plots import _figure, _save

    d = np.asarray(disagreement)
    fig = _figure(12, 3.6)
    ax = fig.subplots(1, 3)
    ax[0].hist(d, bins=40, color="#4477aa")
    ax[0].set(xlabel="half-set disagreement (Å)", ylabel="Gaussians")
    ax[1].scatter(displacement, d, s=3, alpha=0.5)
    lim = float(max(np.max(displacement), np.max(d), 1e-3))
    ax[1].plot([0, lim], [0, lim], "k--", lw=0.8)
    ax[1].set(xlabel="RMS displacement (Å)", ylabel="disagreement (Å)")
    pos = np.asarray(positions)
    sc = ax[2].scatter(pos[:, 0], pos[:, 1], c=d, s=4, cmap="viridis")
    ax[2].set(xlabel="x (Å)", ylabel="y (Å)", aspect="equal", title="coloured by disagreement")
    fig.colorbar(sc, ax=ax[2], label="Å")
    return _save(fig, path)
