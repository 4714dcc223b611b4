"""Steps ``decoded_maps`` and ``traversals``: maps the model decodes from its embedding.

Maps are resampled to the original box and pixel size (the decoder's template spans the
training box, so nothing beyond the training Nyquist is in them) and written under
``maps/decoded/``: ``clusters/cluster_NNN.mrc`` at the k-means centres (or
``consensus/consensus_000.mrc`` for a model without embedding), ``pcN/pcN_NNN.mrc`` along the
principal components, each folder with a ChimeraX ``.cxc``. Maps the method made for its own
states (``result.state_maps``) go to ``maps/method/<label>_NNN.mrc``.
"""

from __future__ import annotations

import numpy as np

from hetero.analysis import latent as L
from hetero.analysis import plots as P
from hetero.analysis import report as R
from hetero.analysis.steps.clustering import label_slug
from hetero.analysis.volumes import resample_to_box

SECTION = "Decoded maps"


def decoded_maps(ctx) -> None:
    """Decoded maps at the cluster centres (``ctx.state["clusters"]``), or the consensus."""
    result = ctx.result
    if not ctx.cfg.maps.enabled:
        return
    blocks = ctx.section(SECTION)
    if result.state_maps is not None:
        _method_state_maps(ctx, blocks)
    if result.decode is None:
        blocks.append(
            R.paragraph(
                f"The {result.method} model does not decode maps from its embedding.", "note"
            )
        )
        return
    if result.embedding_dim == 0:
        vols = ctx.decode_to_original(np.zeros((1, 0), np.float32), "Decoding the consensus map")
        ctx.write_series("maps/decoded/consensus", vols, "consensus")
        ctx.state["decoded_consensus"] = vols[0]
        names = ["consensus"]
    else:
        km = ctx.state.get("clusters")
        if km is None:
            raise RuntimeError(
                "decoded_maps needs the clustering step before it (steps=[..., clustering, decoded_maps])"
            )
        vols = ctx.decode_to_original(
            result.embedding[km.center_indices], f"Decoding {km.n_clusters} cluster maps"
        )
        ctx.write_series("maps/decoded/clusters", vols, "cluster")
        ctx.state["decoded_clusters"] = vols
        names = [f"cluster {i}" for i in range(len(vols))]
    blocks.insert(
        0,
        R.paragraph(
            f"Maps decoded by the model, resampled to {ctx.box} px at {ctx.apix:.4g} Å/px "
            "(origin 0); they hold nothing beyond the training box's Nyquist "
            f"({2 * ctx.run.info['apix']:.3g} Å). Open a series in ChimeraX with the .cxc script "
            "in its folder, e.g. `cd maps/decoded/clusters; open clusters.cxc`."
        ),
    )
    blocks.append(
        R.image(
            P.map_gallery(ctx.fig_dir / "decoded_maps.png", vols.numpy(), names),
            "Central slices and projections of each decoded map",
        )
    )


def traversals(ctx) -> None:
    """Decoded maps along the first ``n_pc_traversals`` principal components."""
    result, cfg = ctx.result, ctx.cfg
    pcs = ctx.state.get("pca")
    if not cfg.maps.enabled or result.decode is None or result.embedding_dim == 0 or pcs is None:
        return
    blocks = ctx.section(SECTION)
    for pc in range(min(int(cfg.n_pc_traversals), pcs.n_components)):
        pts = L.pc_traversal(
            pcs,
            pc,
            int(cfg.pc_traversal.steps),
            float(cfg.pc_traversal.low_percentile),
            float(cfg.pc_traversal.high_percentile),
        )
        vols = ctx.decode_to_original(pts, f"Decoding PC{pc + 1} traversal")
        ctx.write_series(f"maps/decoded/pc{pc + 1}", vols, f"pc{pc + 1}", play=True)
        png = P.map_gallery(
            ctx.fig_dir / f"pc{pc + 1}_maps.png",
            vols.numpy(),
            [f"PC{pc + 1} #{i}" for i in range(len(vols))],
        )
        blocks.append(
            R.image(
                png,
                f"PC{pc + 1} traversal ({cfg.pc_traversal.low_percentile}th to "
                f"{cfg.pc_traversal.high_percentile}th percentile)",
            )
        )


def _method_state_maps(ctx, blocks: list[str]) -> None:
    result = ctx.result
    slug = label_slug(result.label_name or "state")
    vols = resample_to_box(result.state_maps, float(result.voxel_size), ctx.box, ctx.apix)
    ctx.write_series("maps/method", vols, slug, first=result.label_first)
    ctx.state["method_state_maps"] = vols
    blocks.append(
        R.image(
            P.map_gallery(
                ctx.fig_dir / "method_state_maps.png",
                vols.numpy(),
                [f"{result.label_name or 'state'} {i + result.label_first}" for i in range(len(vols))],
            ),
            f"The {result.method} model's own maps of its states",
        )
    )
