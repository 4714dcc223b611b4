"""Step ``embedding``: PCA and UMAP of the per-particle embedding.

Writes ``latent/pca_coords.npy`` (N, P), ``latent/pca_components.npz`` and ``latent/umap.npy``
(N, 2); sets ``ctx.state["pca"]`` (:class:`~hetero.analysis.latent.PCAResult`) and
``ctx.state["embedding_2d"]`` (``(xy (N, 2), (x label, y label), name)``: UMAP, else PC1/PC2).
"""

from __future__ import annotations

import numpy as np

from hetero.analysis import latent as L
from hetero.analysis import plots as P
from hetero.analysis import report as R
from hetero.utils.files import write_npy

SECTION = "Latent space"


def embedding(ctx) -> None:
    """PCA (``pca_components``) and UMAP (``umap.*``) of ``ctx.result.embedding``."""
    result, cfg = ctx.result, ctx.cfg
    z = result.embedding
    n, dim = z.shape
    blocks = ctx.section(SECTION)
    if dim == 0:
        blocks.append(
            R.paragraph(f"The {result.method} model has no per-particle embedding.", "note")
        )
        return
    pcs = L.pca(z, int(cfg.pca_components))
    ctx.state["pca"] = pcs
    latent = ctx.out / "latent"
    write_npy(latent / "pca_coords.npy", pcs.coords.astype(np.float32))
    np.savez(
        latent / "pca_components.npz",
        mean=pcs.mean,
        components=pcs.components,
        explained_variance=pcs.explained_variance,
        explained_variance_ratio=pcs.explained_variance_ratio,
    )
    ctx.files += [latent / "pca_coords.npy", latent / "pca_components.npz"]
    ctx.metrics["pca_explained_variance_ratio"] = [float(v) for v in pcs.explained_variance_ratio]
    blocks.append(
        R.image(
            P.explained_variance(ctx.fig_dir / "pca_variance.png", pcs.explained_variance_ratio),
            "PCA explained variance",
        )
    )
    if pcs.n_components >= 2:
        _set_2d(ctx, blocks, pcs.coords[:, :2], ("PC1", "PC2"), "pca", "PC1/PC2")
    if cfg.umap.enabled and n >= 4:
        task = ctx.progress.add_task(f"UMAP ({n} particles)", total=None)
        emb = L.umap_embedding(
            z,
            cfg.umap.n_neighbors,
            cfg.umap.min_dist,
            cfg.umap.get("max_points"),
            int(cfg.umap.seed),
        )
        ctx.progress.update(task, total=1, completed=1)
        write_npy(latent / "umap.npy", emb)
        ctx.files.append(latent / "umap.npy")
        _set_2d(ctx, blocks, emb, ("UMAP1", "UMAP2"), "umap", "UMAP")
    blocks.append(
        R.table(
            [(f"PC{i + 1}", float(v)) for i, v in enumerate(pcs.explained_variance_ratio)],
            ["component", "explained variance ratio"],
        )
    )


def _set_2d(ctx, blocks: list[str], xy: np.ndarray, axes: tuple[str, str], name: str, title: str):
    """Make ``xy`` the 2-D embedding later steps draw on, with its density figure."""
    ctx.state["embedding_2d"] = (xy, axes, name)
    png = P.hexbin_density(ctx.fig_dir / f"{name}_density.png", xy, f"{title} density", axes)
    blocks.append(R.image(png, f"{title} particle density"))
