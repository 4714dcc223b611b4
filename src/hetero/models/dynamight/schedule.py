"""DynaMight's training schedule: which epochs do what, and the update rate that ends training.

Everything here is a pure function of the epoch number and of plain state kept in the model's
buffers, so resuming from a checkpoint replays it exactly. Defaults are the reference's
(``deformations/optimize_deformations.py``; see ``conf/schedule/dynamight.yaml``).

Epochs (0-based ``e``):

- warm-up, ``e < n_warmup_epochs``: deformations bypassed, only the consensus is fitted;
- position epochs, ``e > n_warmup_epochs + position_delay`` and ``e % position_period <
  position_length``: only the consensus is updated, without the geometric term;
- consensus re-estimation after epochs with ``e % position_period == consensus_update_phase``;
- noise whitening updated after epochs ``e > n_warmup_epochs + whitening_delay``;
- the regularisation weight is calibrated before every epoch ``e > n_warmup_epochs`` (0 during
  warm-up and the first epoch after it);
- the update rate is checked every ``max(check_particles // N, 1)`` epochs and forced to 0 after
  epoch ``n_epochs``; once both half sets' rates are 0 (epoch ``F``), ``F // 3`` more epochs run.
"""

from __future__ import annotations

import math


class DynaMightSchedule:
    """Epoch schedule (all counts in epochs).

    :param n_warmup_epochs: consensus-only epochs at the start (reference 3).
    :param n_epochs: epochs after which consensus updates stop (reference 150).
    :param position_period: period of the position epochs and re-estimations (reference 30).
    :param position_length: position epochs per period (reference 8).
    :param position_delay: no position epochs before ``n_warmup_epochs + position_delay`` (8).
    :param consensus_update_phase: re-estimate the consensus after epochs with this phase (15).
    :param whitening_delay: whitening starts after ``n_warmup_epochs + whitening_delay`` (10).
    :param check_particles: the update-rate check runs every ``max(check_particles // N, 1)``
        epochs (reference 50000).
    :param finalisation_divisor: after both rates reach 0 at epoch ``F``, run ``F //
        finalisation_divisor`` more epochs (reference 3).
    """

    def __init__(
        self,
        n_warmup_epochs: int = 3,
        n_epochs: int = 150,
        position_period: int = 30,
        position_length: int = 8,
        position_delay: int = 8,
        consensus_update_phase: int = 15,
        whitening_delay: int = 10,
        check_particles: int = 50000,
        finalisation_divisor: int = 3,
    ) -> None:
        self.n_warmup_epochs = int(n_warmup_epochs)
        self.n_epochs = int(n_epochs)
        self.position_period = max(1, int(position_period))
        self.position_length = int(position_length)
        self.position_delay = int(position_delay)
        self.consensus_update_phase = int(consensus_update_phase)
        self.whitening_delay = int(whitening_delay)
        self.check_particles = int(check_particles)
        self.finalisation_divisor = max(1, int(finalisation_divisor))

    def is_warmup(self, epoch: int) -> bool:
        return epoch < self.n_warmup_epochs

    def is_position_epoch(self, epoch: int) -> bool:
        return (epoch > self.n_warmup_epochs + self.position_delay
                and epoch % self.position_period < self.position_length)

    def phase(self, epoch: int, frozen: bool = False) -> str:
        """``"warmup"``, ``"position"`` or ``"main"`` (position epochs end once the consensus
        is frozen: there is nothing left to update in them)."""
        if self.is_warmup(epoch):
            return "warmup"
        if self.is_position_epoch(epoch) and not frozen:
            return "position"
        return "main"

    def reestimates_consensus(self, epoch: int) -> bool:
        """Re-estimate the consensus from the least-deformed particles after ``epoch``."""
        return (not self.is_warmup(epoch)
                and epoch % self.position_period == self.consensus_update_phase)

    def whitening_active(self, epoch: int) -> bool:
        """Update the noise spectrum after ``epoch``."""
        return epoch > self.n_warmup_epochs + self.whitening_delay

    def calibrates(self, epoch: int) -> bool:
        """Calibrate the regularisation weight before ``epoch``."""
        return epoch > self.n_warmup_epochs

    def check_every(self, n_particles: int) -> int:
        return max(self.check_particles // max(int(n_particles), 1), 1)

    def stop_epoch(self, frozen_epoch: int) -> int:
        """First epoch that is *not* run once both rates are 0 since ``frozen_epoch``."""
        return frozen_epoch + frozen_epoch // self.finalisation_divisor

    def __repr__(self) -> str:
        return (f"DynaMightSchedule(warmup={self.n_warmup_epochs}, n_epochs={self.n_epochs}, "
                f"period={self.position_period})")


def update_rate_check(
    rate: float, history: list[float], failures: int, loss: float, decay: float = 0.95,
    floor: float = 0.1,
) -> tuple[float, list[float], int]:
    """One update-rate check of a half set (reference ``optimize_deformations``).

    The check fails when ``loss`` is above the mean of the last two recorded losses; from the
    second consecutive failure on, each failure multiplies the rate by ``decay``; a rate below
    ``floor`` becomes 0 (consensus and regularisation weight frozen).

    :param history: the last recorded losses (at most two are used; NaN entries are ignored).
    :return: ``(rate, history, failures)`` after the check (``loss`` appended to the history).
    """
    recent = [h for h in history[-2:] if not math.isnan(h)]
    failed = len(recent) == 2 and loss > sum(recent) / 2
    failures = failures + 1 if failed else 0
    if failed and failures >= 2:
        rate *= decay
    if rate < floor:
        rate = 0.0
    return rate, [*history, float(loss)][-2:], failures
