"""Errors whose message tells the user everything: the entry points print them without a
traceback, write them to the run's log and exit non-zero.

Input problems raise :class:`hetero.data.io.errors.InputError` (a ``ValueError``); problems
found by the tasks themselves (a configuration that cannot work on this machine, a resume
that would mix two runs, a training that diverged, a scheduler's SIGTERM) raise a subclass of
:class:`HeteroError`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re


class HeteroError(Exception):
    """An error that the user can act on from its message alone.

    :attr exit_code: the process exit status the entry points use for it.
    """

    exit_code: int = 1


class ConfigError(HeteroError, ValueError):
    """A configuration that cannot work (wrong accelerator, conflicting resume overrides...)."""

    exit_code = 2


class NonFiniteError(HeteroError, FloatingPointError):
    """Training produced a non-finite loss or gradient (the weights were not updated)."""


class Preempted(HeteroError):
    """The run was stopped by SIGTERM (exit status 143, 128 + SIGTERM, what schedulers report
    for a terminated job): training after saving a resumable checkpoint, an analysis with the
    earlier analysis put back."""

    exit_code = 143


# A DataLoader worker re-raises an exception as "Caught X in DataLoader worker process N.
# Original Traceback (most recent call last): ... module.X: <message>".
_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*\nOriginal Traceback")


def user_message(err: BaseException) -> str:
    """The message of ``err`` without the traceback text a DataLoader worker wraps it in."""
    text = str(err)
    if not _WORKER.match(text):
        return text
    name = type(err).__name__
    for i, line in enumerate(text.splitlines()):
        head, sep, rest = line.partition(": ")
        if sep and (head == name or head.endswith("." + name)):
            return "\n".join([rest, *text.splitlines()[i + 1 :]]).strip()
    return text


__all__ = ["ConfigError", "HeteroError", "NonFiniteError", "Preempted", "user_message"]
