"""Analysis of trained runs: latent space, maps, particle subsets, figures, report, metrics.

Modules (import them directly; this package imports nothing heavy on its own):

- :mod:`hetero.analysis.latent`: PCA, UMAP, k-means with snapped centres, PC traversals;
- :mod:`hetero.analysis.volumes`: decode maps, resample to the original grid, write .mrc/.cxc;
- :mod:`hetero.analysis.subsets`: RELION .star and index files per cluster;
- :mod:`hetero.analysis.metrics`: ARI/AMI, FSC against ground truth, neighbourhood similarity;
- :mod:`hetero.analysis.plots`: matplotlib figures (Agg, no pyplot);
- :mod:`hetero.analysis.report`: the self-contained report.html;
- :mod:`hetero.analysis.rundir`: reading a training run directory back.
"""
