"""Annealing schedules for loss weights: stateless callables of training progress.

Each schedule maps a position ``x`` (``unit="images"``: images seen, summed over all ranks;
``unit="steps"``: optimiser steps) to a weight. Because they hold no state, resuming from a
checkpoint is automatically correct as long as the position is restored (the OPUS-DSD model
keeps ``images_seen`` in a persistent buffer).

Example usage::

    beta = SawtoothSchedule()          # OPUS-DSD's "cos" schedule, which is really linear
    beta(0), beta(50_000), beta(110_000), beta(125_000)   # 0.001, ~0.5, 1.0, 0.001
"""

from __future__ import annotations

import math
from typing import Literal

Unit = Literal["images", "steps"]


class ConstantSchedule:
    """A constant weight ``value``.

    :param value: the weight at every position.
    :param unit: what the caller passes (irrelevant here; kept for a uniform interface).
    """

    def __init__(self, value: float = 1.0, unit: Unit = "steps") -> None:
        self.value = float(value)
        self.unit = unit

    def __call__(self, x: float) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"ConstantSchedule(value={self.value})"


class _CyclicSchedule:
    """A rise from ``start`` to ``end`` over ``ramp`` units, held at ``end`` until ``period``,
    then restarting; subclasses give the shape of the rise (:meth:`rise`, ``[0, 1] -> [0, 1]``).
    ``period = inf`` (``.inf`` in YAML) gives a single warm-up."""

    def __init__(
        self,
        start: float = 0.001,
        end: float = 1.0,
        ramp: float = 100_000,
        period: float = 125_000,
        unit: Unit = "images",
    ) -> None:
        if ramp <= 0 or period < ramp:
            raise ValueError(f"need 0 < ramp <= period, got ramp={ramp}, period={period}")
        self.start, self.end = float(start), float(end)
        self.ramp, self.period = float(ramp), float(period)
        self.unit = unit

    @staticmethod
    def rise(t: float) -> float:
        raise NotImplementedError

    def __call__(self, x: float) -> float:
        x = max(float(x), 0.0)
        phase = math.fmod(x, self.period) if math.isfinite(self.period) else x
        return self.start + (self.end - self.start) * self.rise(min(phase / self.ramp, 1.0))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(start={self.start}, end={self.end}, ramp={self.ramp}, "
            f"period={self.period}, unit={self.unit!r})"
        )


class SawtoothSchedule(_CyclicSchedule):
    """Linear ramp from ``start`` to ``end`` over ``ramp`` units, held at ``end`` until ``period``,
    then restarting: ``clip(start + (x mod period) * (end - start) / ramp, start, end)``.

    The defaults are the OPUS-DSD reference's ``CosSchedule(0.001, 1, 0, 1e5)`` as used by
    ``train_cv`` (a linear sawtooth despite its name): ramp over 100k images, hold for 25k.

    :param start: value at the start of each cycle.
    :param end: value reached after ``ramp`` units and held until the cycle ends.
    :param ramp: length of the linear ramp (units of ``unit``).
    :param period: cycle length (``>= ramp``).
    :param unit: ``"images"`` (images seen over all ranks, the reference) or ``"steps"``.
    """

    @staticmethod
    def rise(t: float) -> float:
        return t


class CosineSchedule(_CyclicSchedule):
    """Cyclical cosine annealing: a half-cosine rise from ``start`` to ``end`` over ``ramp``
    units, held at ``end`` until ``period``, then restarting
    (``start + (end - start) * (1 - cos(pi * min(phase / ramp, 1))) / 2``).

    With ``period = ramp`` this is a pure cyclical cosine; ``period = inf`` (``.inf`` in YAML)
    gives a single warm-up.

    :param start: value at the start of each cycle. :param end: value after the ramp.
    :param ramp: ramp length. :param period: cycle length (``>= ramp``).
    :param unit: ``"images"`` or ``"steps"``.
    """

    @staticmethod
    def rise(t: float) -> float:
        return 0.5 * (1.0 - math.cos(math.pi * t))
