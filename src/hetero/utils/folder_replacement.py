"""Replace an output folder's contents as a whole: never a mix of two runs' files, never a loss
of the last completed contents.

Every change of state is ONE ``os.rename`` inside the folder's parent (the real one: the path
is resolved first, so a symlinked folder on another file system works), so a process killed
at any point leaves a state the next :meth:`FolderReplacement.begin` repairs:

- ``begin``: ``folder -> .<name>.previous`` (the completed contents, whole), a new empty
  ``folder``, then the kept entries (e.g. a cache) moved back into it;
- ``commit``: ``.<name>.previous -> .<name>.trash-<pid>-<id>``, then deleted;
- ``rollback`` (and the repair of an interrupted run): ``folder -> .<name>.trash-<pid>-<id>``,
  ``.<name>.previous -> folder``, the kept entries moved back from the trash.

So ``.<name>.previous`` exists only while a replacement is under way and always holds complete
contents. A lock (``.<name>.lock``, a folder made with ``os.mkdir``, holding the owner's host
and pid) keeps two processes from replacing the same folder at once; a lock left by a dead
process on this host is taken over.

Example usage::

    with FolderReplacement(run_dir / "analysis", keep=("latents",)) as folder:
        ...  # write the new contents into `folder`; an exception puts the old ones back
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path


class FolderBusyError(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderReplacement:
    """See the module docstring.

    :param folder: the folder whose contents are replaced (created if missing).
    :param keep: names of entries carried over from the old contents into the new (a cache).
    :raises ValueError: a path without a name (``/``).
    """

    def __init__(self, folder: str | Path, keep: tuple[str, ...] = ()) -> None:
        self.folder = Path(os.path.realpath(Path(folder).expanduser()))
        if not self.folder.name:
            raise ValueError(f"{folder}: cannot replace the contents of a file-system root")
        self.keep = tuple(keep)
        parent, name = self.folder.parent, self.folder.name
        self.previous = parent / f".{name}.previous"
        self.lock = parent / f".{name}.lock"
        self._had_contents = False
        self._locked = False

    # -- the lock --------------------------------------------------------------------------
    def _acquire(self) -> None:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                os.mkdir(self.lock)
            except FileExistsError:
                if not self._stale():
                    owner = (self.lock / "owner").read_text().strip() if (self.lock / "owner").is_file() else "?"
                    raise FolderBusyError(f"{self.folder} is being written by another process ({owner}); "
                                          f"if none is running, delete {self.lock}") from None
                shutil.rmtree(self.lock, ignore_errors=True)
                continue
            (self.lock / "owner").write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
            self._locked = True
            return
        raise FolderBusyError(f"could not take the lock {self.lock}")

    def _stale(self) -> bool:
        """A lock of a process of this host that no longer runs (unreadable: not stale)."""
        try:
            host, _, pid = (self.lock / "owner").read_text().split()
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (OSError, ValueError):
            return False
        return False

    def _release(self) -> None:
        if self._locked:
            shutil.rmtree(self.lock, ignore_errors=True)
            self._locked = False

    # -- the steps -------------------------------------------------------------------------
    def _new_trash(self) -> Path:
        import uuid

        return self.folder.parent / f".{self.folder.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _carry_kept(self, src: Path, dst: Path) -> None:
        for name in self.keep:
            if (src / name).exists() and not (dst / name).exists():
                os.rename(src / name, dst / name)

    def _clean_trash(self) -> None:
        for p in self.folder.parent.glob(f".{self.folder.name}.trash-*"):
            shutil.rmtree(p, ignore_errors=True)

    def _restore_previous(self) -> None:
        """``.previous`` back in place; what ``folder`` held goes to the trash (kept entries
        carried over)."""
        trash = self._new_trash()
        if self.folder.exists() or self.folder.is_symlink():
            os.rename(self.folder, trash)
        os.rename(self.previous, self.folder)
        if trash.is_dir():
            self._carry_kept(trash, self.folder)
        self._clean_trash()

    def begin(self) -> bool:
        """Take the lock and move the current contents aside.

        :return: whether an interrupted replacement was found and its previous contents put
            back first.
        :raises FolderBusyError: another live process holds the lock.
        :raises NotADirectoryError: ``folder`` is a file.
        """
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is a file, not a folder")
        self._acquire()
        try:
            repaired = self.previous.is_dir()
            if repaired:
                self._restore_previous()
            self._clean_trash()
            self._had_contents = self.folder.is_dir() and any(
                p.name not in self.keep for p in self.folder.iterdir())
            if self.folder.is_dir():
                os.rename(self.folder, self.previous)
            self.folder.mkdir()
            if self.previous.is_dir():
                self._carry_kept(self.previous, self.folder)
        except BaseException:
            if self.previous.is_dir():
                self._restore_previous()
            self._release()
            raise
        return repaired

    def had_contents(self) -> bool:
        """Whether :meth:`begin` moved earlier contents (other than kept entries) aside."""
        return self._had_contents

    def commit(self) -> None:
        """Drop the earlier contents (first renamed to the trash, so an interrupted delete
        never leaves a partial ``.previous``) and release the lock."""
        try:
            if self.previous.is_dir():
                os.rename(self.previous, self._new_trash())
            self._clean_trash()
        finally:
            self._release()

    def rollback(self) -> None:
        """Put the earlier contents back (or, with none, leave only the kept entries) and
        release the lock."""
        try:
            if self.previous.is_dir():
                self._restore_previous()
            elif self.folder.is_dir():
                trash = self._new_trash()
                os.rename(self.folder, trash)
                self.folder.mkdir()
                self._carry_kept(trash, self.folder)
                self._clean_trash()
        finally:
            self._release()

    def __enter__(self) -> Path:
        self.begin()
        return self.folder

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
