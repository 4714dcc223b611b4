"""Per-particle arrays of an inference pass, kept with the checkpoint they came from.

Every set of latents lives in its own folder named after the checkpoint that made it,
``<root>/latents/<stem>-<sha256[:12]>/`` (e.g. ``latents/best-3f2a9c0d81b7/``), holding one
``<name>.npy`` per predicted array (``z_mu.npy``, ``z_logstd.npy``, model extras such as the
OPUS-DSD memory bank) and ``source.json``: the checkpoint's path, size, modification time and
SHA-256, the particle count and the particle file. Latents are reused only when the SHA-256 of
the checkpoint being analysed equals the recorded one.

The training task writes the latents of the checkpoint it keeps under ``<run_dir>/latents/``;
analysis that has to (re)compute latents writes them under its own output folder, so an
analysis with another checkpoint, other data or ``recompute_latents=true`` never writes into a
folder another analysis reads. A folder is assembled under a temporary name and renamed into
place in one step: concurrent writers never leave a mixed or half-written folder.

Example usage::

    ckpt = CheckpointId.of(run.checkpoint)
    arrays = read_latents(run.path / "latents" / ckpt.key, ckpt)     # None unless it matches
    folder = write_latents(out / "latents", ckpt, arrays, particles="data.star")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetero.utils.files import write_json, write_npy
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

SOURCE_NAME = "source.json"


@dataclass(frozen=True)
class CheckpointId:
    """Identity of a checkpoint file: path, size, mtime and content hash.

    :param path: resolved path of the checkpoint.
    :param sha256: hex SHA-256 of its bytes.
    """

    path: Path
    sha256: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | Path) -> CheckpointId:
        """Hash ``path`` (read once in 4 MiB blocks)."""
        path = Path(path).resolve()
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(4 << 20), b""):
                digest.update(block)
        st = path.stat()
        return cls(path=path, sha256=digest.hexdigest(), size=st.st_size, mtime_ns=st.st_mtime_ns)

    @property
    def key(self) -> str:
        """Folder name of this checkpoint's latents: ``<stem>-<sha256[:12]>``."""
        return f"{self.path.stem}-{self.sha256[:12]}"

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
        }


def read_latents(folder: str | Path, checkpoint: CheckpointId) -> dict[str, np.ndarray] | None:
    """The arrays of ``folder`` if its ``source.json`` records ``checkpoint``'s SHA-256, else
    ``None`` (absent, or made by another checkpoint: logged)."""
    folder = Path(folder)
    source = folder / SOURCE_NAME
    if not source.is_file():
        return None
    meta = json.loads(source.read_text())
    recorded = (meta.get("checkpoint") or {}).get("sha256")
    if recorded != checkpoint.sha256:
        log.info(
            f"{folder} holds latents of another checkpoint ({meta.get('checkpoint', {}).get('path')}); "
            "not reused"
        )
        return None
    names = meta.get("arrays") or sorted(p.stem for p in folder.glob("*.npy"))
    return {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in names}


def write_latents(
    root: str | Path,
    checkpoint: CheckpointId,
    arrays: dict[str, np.ndarray],
    particles: str | None = None,
    written_by: str = "",
) -> Path:
    """Write ``arrays`` into ``<root>/<checkpoint.key>/`` in one atomic rename.

    An existing folder for the same checkpoint is replaced (moved aside, then the new one renamed
    into place; never edited in place), also when another process writes it at the same time.

    :return: the folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / checkpoint.key
    tmp = Path(tempfile.mkdtemp(prefix=f".{checkpoint.key}.", dir=root))
    try:
        for name, array in arrays.items():
            write_npy(tmp / f"{name}.npy", np.asarray(array))
        n = {int(np.asarray(a).shape[0]) for a in arrays.values() if np.asarray(a).ndim}
        write_json(
            tmp / SOURCE_NAME,
            {
                "checkpoint": checkpoint.as_dict(),
                "arrays": sorted(arrays),
                "n_particles": n.pop() if len(n) == 1 else None,
                "particles": particles,
                "written_by": written_by,
            },
        )
        os.chmod(tmp, 0o777 & ~_umask())
        _rename_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _rename_into_place(tmp: Path, target: Path, attempts: int = 100) -> None:
    """Rename the finished folder ``tmp`` to ``target``, moving an existing ``target`` (made for
    the same checkpoint, maybe by a concurrent writer) aside first; the folder at ``target`` is
    always one writer's complete folder."""
    for _ in range(attempts):
        try:
            os.rename(tmp, target)
            return
        except OSError as err:  # target exists (or reappeared): move it aside and try again
            if not tmp.is_dir():
                raise
            last = err
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        try:
            os.rename(target, trash / "x")
        except FileNotFoundError:  # another writer moved it first
            pass
        shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not rename {tmp} to {target}: other processes keep writing it") from last


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
