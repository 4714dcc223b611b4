"""Structural check of a STAR file's loops: every data row has one value per declared column.

The STAR parser (``starfile``, through pandas) fills a short row with NaN in its *last*
columns, so a value missing in the middle of a row shifts every later value one column to the
left without a word when the last column is one hetero does not read. :func:`check_loop_rows`
counts the values of every row of every loop first and raises :class:`InputError` naming the
file, the line, the row and the columns.

The scan is vectorised over the file's bytes in chunks (a 1M-particle file costs about a
second and a few chunk-sized buffers, not a Python loop over its lines). Values in quotes
(``"a b"``) are counted with :func:`shlex.split` on the lines that contain a quote.

Example usage::

    check_loop_rows(Path("run_data.star"))    # raises InputError at the first bad row
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from hetero.data.io.errors import InputError

_CHUNK = 8 * 2**20
_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 13, 32]] = True
# Line kinds.
_BLANK, _DATA, _COLUMN, _BLOCK, _LOOP, _COMMENT = range(6)


def _lines(chunk: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[bytes]]:
    """Per line of ``chunk`` (which ends at a line end): kind, value count, and for structural
    lines their text. Returns ``(kinds, counts, quoted, texts)`` with ``texts`` aligned to the
    non-data lines only."""
    arr = np.frombuffer(chunk, dtype=np.uint8)
    ends = np.flatnonzero(arr == 10)
    if not len(ends) or ends[-1] != len(arr) - 1:
        ends = np.append(ends, len(arr))
    n = len(ends)
    ws = _WS[arr]
    starts_tok = ~ws & np.concatenate([[True], ws[:-1]])
    tok_pos = np.flatnonzero(starts_tok)
    tok_line = np.searchsorted(ends, tok_pos)
    counts = np.bincount(tok_line, minlength=n)[:n]
    first = np.r_[True, np.diff(tok_line) > 0] if len(tok_line) else np.zeros(0, dtype=bool)
    first_pos, first_line = tok_pos[first], tok_line[first]
    kinds = np.full(n, _BLANK, dtype=np.int8)
    kinds[first_line] = _DATA
    head = np.zeros((len(first_pos), 5), dtype=np.uint8)
    for i in range(5):
        idx = np.minimum(first_pos + i, len(arr) - 1)
        head[:, i] = arr[idx]
    c0 = head[:, 0]
    kinds[first_line[c0 == ord("_")]] = _COLUMN
    kinds[first_line[c0 == ord("#")]] = _COMMENT
    for word, kind in ((b"data_", _BLOCK), (b"loop_", _LOOP)):
        match = (head == np.frombuffer(word, dtype=np.uint8)).all(axis=1)
        kinds[first_line[match]] = kind
    quote = (arr == ord('"')) | (arr == ord("'"))
    quoted = np.zeros(n, dtype=bool)
    quoted[np.searchsorted(ends, np.flatnonzero(quote))] = True
    line_starts = np.r_[0, ends[:-1] + 1]
    special = np.flatnonzero((kinds != _DATA) & (kinds != _BLANK) | quoted)
    texts = [chunk[line_starts[i] : ends[i]] for i in special]
    return kinds, counts, quoted, texts


def _chunks(path: Path):
    with open(path, "rb") as fh:
        rest = b""
        while True:
            block = fh.read(_CHUNK)
            if not block:
                if rest:
                    yield rest
                return
            data = rest + block
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            yield data[: cut + 1]
            rest = data[cut + 1 :]


class _State:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.block = ""
        self.columns: list[str] = []
        self.in_loop = False
        self.rows = 0

    def fail(self, lineno: int, found: int) -> None:
        cols = self.columns
        listed = ", ".join(cols) if len(cols) <= 14 else ", ".join(cols[:14]) + ", ..."
        raise InputError(
            f"{self.path}, line {lineno} (data_{self.block} row {self.rows}): {found} values but "
            f"the loop declares {len(cols)} columns ({listed}); every row needs exactly one "
            "value per column (a value is missing or extra, which would shift the columns "
            "after it): fix or remove that row"
        )


def check_loop_rows(path: str | Path) -> None:
    """Raise :class:`InputError` at the first loop row whose value count differs from the
    number of columns its loop declares (file, line, block, row, columns)."""
    path = Path(path)
    state = _State(path)
    line0 = 0
    for chunk in _chunks(path):
        kinds, counts, quoted, texts = _lines(chunk)
        special = np.flatnonzero((kinds != _DATA) & (kinds != _BLANK) | quoted)
        text_of = dict(zip(special.tolist(), texts))
        prev = 0
        for i in [*special.tolist(), len(kinds)]:
            _check_data(state, kinds, counts, prev, i, line0)
            if i == len(kinds):
                break
            _structural(state, kinds[i], text_of[i], counts[i], line0 + i + 1)
            prev = i + 1
        line0 += len(kinds)


def _check_data(state: _State, kinds, counts, lo: int, hi: int, line0: int) -> None:
    """Plain data lines ``lo:hi`` (no quotes) against the current loop's column count."""
    if hi <= lo:
        return
    rows = np.flatnonzero(kinds[lo:hi] == _DATA)
    if not len(rows):
        return
    if not state.in_loop or not state.columns:
        state.in_loop = False
        return
    bad = np.flatnonzero(counts[lo:hi][rows] != len(state.columns))
    if len(bad):
        state.rows += int(bad[0]) + 1
        state.fail(line0 + lo + int(rows[bad[0]]) + 1, int(counts[lo + rows[bad[0]]]))
    state.rows += len(rows)


def _structural(state: _State, kind: int, text: bytes, count: int, lineno: int) -> None:
    line = text.decode(errors="replace").strip()
    if kind == _BLOCK:
        state.block, state.columns, state.in_loop, state.rows = line[5:], [], False, 0
    elif kind == _LOOP:
        state.columns, state.in_loop, state.rows = [], True, 0
    elif kind == _COLUMN:
        if state.in_loop and state.rows == 0:
            state.columns.append(line.split()[0].lstrip("_"))
        else:
            state.in_loop = False
    elif kind == _DATA and state.in_loop and state.columns:  # a data row with quotes
        state.rows += 1
        try:
            found = len(shlex.split(line, comments=False, posix=True))
        except ValueError:
            found = count
        if found != len(state.columns):
            state.fail(lineno, found)
