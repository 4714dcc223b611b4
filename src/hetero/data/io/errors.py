"""Errors raised for bad user input (particle files, stacks, pickles).

Every message names the offending file and, where it applies, the line, column, row or
image index and what was expected, so that users can fix their input without reading code.
"""

from __future__ import annotations

import pickle


class InputError(ValueError):
    """A user-supplied file is missing, malformed or inconsistent."""


class StackIndexError(InputError, IndexError):
    """An image index lies outside its stack (also an :class:`IndexError`)."""


class MissingFileError(InputError, FileNotFoundError):
    """A referenced input file does not exist (also a :class:`FileNotFoundError`)."""


class UnsafePickleError(InputError, pickle.UnpicklingError):
    """A pickle references a global outside the allowed numpy/container set (also a
    :class:`pickle.UnpicklingError`); nothing from it was executed."""
