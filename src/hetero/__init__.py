"""hetero: cryo-EM structural heterogeneity analysis (OPUS-DSD, DynaMight, AlphaCryo4D).

Layering (dependencies point one way): ``physics`` (pure tensor functions) <- ``data`` (file
formats, datasets, samplers, synthetic data) <- ``losses``/``models`` <- ``analysis`` <- ``tasks``
(what ``train.py`` and ``analyze.py`` run). Heavy libraries are imported lazily by the
modules that need them, so ``import hetero`` is cheap.
"""

__version__ = "0.1.0"
