"""The shared analysis steps: each is ``step(ctx: AnalysisContext) -> None``, testable alone.

=================== ========================================================================
``embedding``       PCA and UMAP of the embedding (``latent/``; state ``pca``, ``embedding_2d``)
``clustering``      k-means with snapped centres, and the method's own labels (``clusters/``;
                    state ``clusters``, ``method_labels``)
``landscape``       pseudo-energy landscape of the particle density over the 2-D embedding,
                    minimum-energy path, states along it, maps decoded along it (``landscape/``;
                    off unless ``landscape.enabled``)
``decoded_maps``    maps decoded at cluster centres / the consensus (``maps/decoded/``)
``traversals``      maps decoded along principal components (``maps/decoded/pcN/``)
``ground_truth``    ARI/AMI, oracle, per-state and per-image FSC of decoded maps, neighbourhoods
``reconstruction``  per-cluster / per-state / consensus half maps and FSC from the particles
                    (``maps/reconstructed/``), scored against true states when known
``subsets``         RELION .star and index files per cluster / method label (``subsets/``)
``report``          summary, training curves, metrics.json and report.html (always last)
=================== ========================================================================

``steps`` in ``conf/analyze.yaml`` lists them in order (short names here, or dotted paths of
any function with the same signature); a run manifest's ``analysis_steps`` follow them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from omegaconf import DictConfig

SHARED_STEPS = {
    "embedding": "hetero.analysis.steps.embedding.embedding",
    "clustering": "hetero.analysis.steps.clustering.clustering",
    "landscape": "hetero.analysis.steps.landscape.landscape",
    "decoded_maps": "hetero.analysis.steps.decoded.decoded_maps",
    "traversals": "hetero.analysis.steps.decoded.traversals",
    "ground_truth": "hetero.analysis.steps.ground_truth.ground_truth",
    "reconstruction": "hetero.analysis.steps.reconstruction.reconstruction",
    "subsets": "hetero.analysis.steps.subsets.subsets",
    "report": "hetero.analysis.steps.report.report",
}


# The ``enabled`` blocks of conf/analyze.yaml that the shared steps read. A method step that
# reads a block of its own says so with an ``options`` attribute (``step.options = "name"``), so
# that ``analyze`` can refuse a block switched on for a run none of whose steps reads it.
SHARED_OPTIONS = ("umap", "landscape", "subsets", "maps", "reconstruction", "ground_truth")


def unclaimed_options(cfg, steps: list[Callable]) -> list[str]:
    """Top-level blocks of ``cfg`` with ``enabled: true`` that neither a shared step
    (:data:`SHARED_OPTIONS`) nor one of ``steps`` (their ``options`` attribute) reads."""
    claimed = set(SHARED_OPTIONS) | {getattr(s, "options", None) for s in steps}
    return [
        str(key)
        for key, block in cfg.items()
        if isinstance(block, Mapping | DictConfig)
        and block.get("enabled") is True
        and key not in claimed
    ]


def resolve_step(name: str) -> Callable:
    """The step function for a short name of :data:`SHARED_STEPS` or a dotted path.

    :raises ValueError: an unknown short name (listing the known ones).
    """
    import hydra

    path = SHARED_STEPS.get(str(name), str(name))
    if "." not in path:
        raise ValueError(
            f"unknown analysis step {name!r}; shared steps: {', '.join(SHARED_STEPS)} "
            "(or a dotted path of a function step(ctx))"
        )
    return hydra.utils.get_method(path)
