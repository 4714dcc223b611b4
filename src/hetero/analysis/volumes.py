"""Maps from latents: decode on the template grid, resample to the original box and pixel
size, write ``.mrc`` series and ChimeraX scripts.

The decoder's template covers the same physical extent as the training box, which covers the
same extent as the original box, so resampling is a Fourier crop/pad to ``original_box``
(:func:`hetero.physics.fourier.fourier_crop_3d`); the voxel size becomes ``original_apix``.

Example usage::

    vols = decode_volumes(result.decode, z_points, batch_size=4)     # (K, T, T, T)
    vols = resample_to_box(vols, result.voxel_size, 128, 1.5)
    paths = write_maps(out / "clusters", vols, apix=1.5, prefix="cluster")
    write_chimerax_script(out / "clusters" / "clusters.cxc", paths, level=contour_level(vols))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hetero.data.io.mrc import write_volume
from hetero.physics.fourier import fourier_crop_3d


@torch.no_grad()
def decode_volumes(
    decode,
    z: np.ndarray,
    batch_size: int = 4,
    progress=None,
    description: str = "Decoding maps",
) -> torch.Tensor:
    """``decode`` (an :class:`~hetero.analysis.result.AnalysisResult`'s ``decode``: ``(K, E)``
    array -> ``(K, T, T, T)`` tensor) at each point of ``z`` ``(K, E)``, in batches:
    ``(K, T, T, T)`` float32 on the CPU.

    :param progress: an optional :class:`rich.progress.Progress` to report on.
    """
    z = np.asarray(z, dtype=np.float32)
    out = []
    task = progress.add_task(description, total=len(z)) if progress is not None else None
    for start in range(0, len(z), max(1, int(batch_size))):
        chunk = z[start : start + max(1, int(batch_size))]
        out.append(torch.as_tensor(decode(chunk)).float().cpu())
        if progress is not None:
            progress.advance(task, len(chunk))
    if not out:
        raise ValueError("no latent points to decode")
    return torch.cat(out)


def resample_to_box(
    volumes: torch.Tensor,
    voxel_size: float,
    box_size: int,
    apix: float,
    rtol: float = 0.02,
) -> torch.Tensor:
    """Fourier-resample ``(..., T, T, T)`` maps with voxel ``voxel_size`` (Å) to ``box_size``
    voxels of ``apix`` Å. Both grids must span the same physical extent (within ``rtol``).
    """
    t = int(volumes.shape[-1])
    extent_in, extent_out = t * float(voxel_size), int(box_size) * float(apix)
    if abs(extent_in - extent_out) > rtol * extent_out:
        raise ValueError(
            f"cannot resample: decoded maps span {t} x {voxel_size:.4g} Å = {extent_in:.4g} Å but "
            f"the original box spans {box_size} x {apix:.4g} Å = {extent_out:.4g} Å"
        )
    return fourier_crop_3d(volumes.float(), int(box_size)).float()


def write_maps(
    folder: str | Path, volumes: torch.Tensor | np.ndarray, apix: float, prefix: str, first: int = 0
) -> list[Path]:
    """Write each ``(D, D, D)`` map as ``<folder>/<prefix>_<iii>.mrc``, ``iii`` counting from
    ``first`` (pixel size ``apix`` in the header, origin 0). Returns the paths in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vols = volumes.detach().cpu().numpy() if isinstance(volumes, torch.Tensor) else np.asarray(volumes)
    width = max(3, len(str(len(vols) - 1 + first)))
    paths = []
    for i, vol in enumerate(vols, start=first):
        path = folder / f"{prefix}_{i:0{width}d}.mrc"
        write_volume(path, np.ascontiguousarray(vol, dtype=np.float32), float(apix),
                     origin_angstrom=(0.0, 0.0, 0.0))
        paths.append(path)
    return paths


def contour_level(volumes: torch.Tensor | np.ndarray, fraction: float = 0.05) -> float:
    """A surface level enclosing about ``fraction`` of the voxels (median over the maps)."""
    vols = volumes.detach().cpu().numpy() if isinstance(volumes, torch.Tensor) else np.asarray(volumes)
    vols = vols.reshape(len(vols), -1)
    return float(np.median(np.quantile(vols, 1.0 - fraction, axis=1)))


def write_chimerax_script(
    path: str | Path,
    maps: Sequence[str | Path],
    level: float,
    play: bool = False,
    color: str = "#b2b2ff",
) -> Path:
    """A ChimeraX ``.cxc`` opening ``maps`` as one volume series (``vseries true``) at ``level``.

    File names are written relative to the script's folder, so open it with
    ``cd <folder>; open <script>`` or ``chimerax <folder>/<script>`` from that folder; the
    whole folder can be copied elsewhere. ``play=True`` adds an oscillating playback (for
    PC traversals).
    """
    from hetero.utils.files import write_text

    path = Path(path)
    names = []
    for m in maps:
        m = Path(m)
        try:
            names.append(str(m.relative_to(path.parent)))
        except ValueError:
            names.append(str(m.resolve()))
    lines = [
        f"# {len(names)} maps written by hetero analyze; run from this folder",
        f"open {' '.join(names)} vseries true",
        f"volume #1 style surface level {level:.6g} color {color}",
        "view",
    ]
    if play:
        lines.append("vseries play #1 loop true direction oscillate maxFrameRate 5")
    return write_text(path, "\n".join(lines) + "\n")
