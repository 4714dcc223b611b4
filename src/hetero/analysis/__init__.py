"""Analysis of trained runs (``docs/design/analysis_interface.md``).

Modules (import them directly; this package imports nothing heavy on its own):

- :mod:`hetero.analysis.rundir`: a training run directory read back (config, manifest, model, data);
- :mod:`hetero.analysis.result`: :class:`~hetero.analysis.result.AnalysisResult`, the generic loader;
- :mod:`hetero.analysis.inference`, :mod:`hetero.analysis.latents`: the inference pass and its
  arrays, kept per checkpoint;
- :mod:`hetero.analysis.context`, :mod:`hetero.analysis.steps`: the steps analysis composes;
- :mod:`hetero.analysis.latent`: PCA, UMAP, k-means with snapped centres, PC traversals;
- :mod:`hetero.analysis.volumes`: decoded maps, resampling to the original grid, .mrc/.cxc;
- :mod:`hetero.analysis.reconstruction`, :mod:`hetero.analysis.resolution`: maps of particle
  groups from their images (half maps, one pass), gold-standard FSC with and without a mask;
- :mod:`hetero.analysis.subsets`: RELION .star and index files per cluster;
- :mod:`hetero.analysis.metrics`, :mod:`hetero.analysis.truth`: ground truth and its scores;
- :mod:`hetero.analysis.plots`: matplotlib figures (Agg, no pyplot);
- :mod:`hetero.analysis.report`: the self-contained report.html.
"""
