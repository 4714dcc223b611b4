"""DynaMight (Schwab, Kimanius, Burt, Dendooven & Scheres, Nat. Methods 2024), part 1: Gaussian
pseudo-atom consensus models deformed per particle by two half-set VAEs (``model=dynamight``).

- :mod:`.consensus`: the Gaussians, their seeding and fit to a map;
- :mod:`.encoder`, :mod:`.decoder`: the networks; :mod:`.half`: one half set's VAE and losses;
- :mod:`.module`: the LightningModule; :mod:`.epoch`: its state and per-epoch tasks;
- :mod:`.schedule`: the epoch schedule and update rate; :mod:`.initialization`: initial maps;
- :mod:`.distributed`: DDP collectives; :mod:`.analysis`: DynaMight-specific analysis outputs.
"""

from hetero.models.dynamight.consensus import GaussianConsensus
from hetero.models.dynamight.decoder import DeformationDecoder, positional_encoding
from hetero.models.dynamight.encoder import HalfSetEncoder
from hetero.models.dynamight.half import HalfSetVAE
from hetero.models.dynamight.module import DynaMight
from hetero.models.dynamight.schedule import DynaMightSchedule, update_rate_check

__all__ = [
    "DeformationDecoder",
    "DynaMight",
    "DynaMightSchedule",
    "GaussianConsensus",
    "HalfSetEncoder",
    "HalfSetVAE",
    "positional_encoding",
    "update_rate_check",
]
