"""Atomic writes into the run directory (nothing half-written is ever left behind)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in the target folder, then rename it.

    The temporary name keeps the suffix so libraries that dispatch on it still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates 0600 files; give outputs the usual permissions (umask applied).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    def _write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.save(fh, array)

    return atomic_write(path, _write)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


class FolderReplacement:
    """Replace a folder's contents as a whole: the old contents come back if the new are not
    completed (the folder never holds a mix of two runs' files).

    :meth:`begin` moves every entry of ``folder`` except ``keep`` (e.g. a cache) aside, into
    ``.<name>.previous`` beside it; :meth:`commit` deletes them; :meth:`rollback` deletes what
    was written since :meth:`begin` (except ``keep``) and moves them back. A process killed in
    between leaves ``.<name>.previous``: the next :meth:`begin` restores it first, so the last
    completed contents are never lost. Renames only (same file system): O(number of entries).

    Example usage::

        repl = FolderReplacement(run_dir / "analysis", keep=("latents",))
        repl.begin()
        try:
            ...  # write the new analysis
        except BaseException:
            repl.rollback()
            raise
        repl.commit()
    """

    def __init__(self, folder: str | Path, keep: tuple[str, ...] = ()) -> None:
        self.folder = Path(folder)
        self.keep = set(keep)
        self.previous = self.folder.with_name(f".{self.folder.name}.previous")

    def _entries(self, folder: Path) -> list[Path]:
        return [p for p in folder.iterdir() if p.name not in self.keep] if folder.is_dir() else []

    def _clear_new(self) -> None:
        import shutil

        for p in self._entries(self.folder):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def _move(self, src: Path, dst: Path) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        for p in self._entries(src):
            os.replace(p, dst / p.name)

    def begin(self) -> bool:
        """Move the current contents aside; returns whether an interrupted replacement's
        contents were restored first."""
        restored = self.previous.is_dir()
        if restored:
            self._clear_new()
            self._move(self.previous, self.folder)
            self.previous.rmdir()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._move(self.folder, self.previous)
        return restored

    def had_contents(self) -> bool:
        """Whether :meth:`begin` moved anything aside."""
        return any(self.previous.iterdir()) if self.previous.is_dir() else False

    def commit(self) -> None:
        import shutil

        shutil.rmtree(self.previous, ignore_errors=True)

    def rollback(self) -> None:
        self._clear_new()
        if self.previous.is_dir():
            self._move(self.previous, self.folder)
            self.previous.rmdir()
