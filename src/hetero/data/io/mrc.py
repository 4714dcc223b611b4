"""MRC image stacks and volumes: lazy, permissive reading and atomic writing.

Arrays are indexed exactly as stored in the MRC data block (``mrcfile``'s convention):
images ``[y, x]``, stacks ``[n, y, x]``, volumes ``[z, y, x]`` (x fastest on disk). See
:mod:`hetero.physics.conventions`.

Headers are parsed here (1024 bytes plus the extended header) rather than by ``mrcfile``,
because stacks written by older tools have no ``MAP`` id or machine stamp; the data block is
then memory-mapped with :class:`numpy.memmap`. Supported modes: 0 (int8), 1 (int16),
2 (float32), 6 (uint16), 12 (float16). Every read returns native float32 copies.

Example usage::

    stack = ImageStack("particles.mrcs")      # nothing is opened yet
    stack.shape                               # (N, D, D), reads the header only
    images = stack.read(np.array([0, 5, 7]))  # (3, D, D) float32
    vol, apix = read_volume("map.mrc")        # (D, D, D) float32, Å/voxel
    write_volume("out.mrc", vol, apix)        # atomic
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from hetero.data.io.errors import InputError, MissingFileError, StackIndexError
from hetero.utils.files import atomic_write

#: Size of the fixed MRC header in bytes.
HEADER_BYTES = 1024
#: MRC mode -> numpy dtype (without byte order) of the data block.
MODE_DTYPES = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}


@dataclass(frozen=True)
class MrcHeader:
    """The parts of an MRC header that matter for reading.

    :param path: the file (for error messages).
    :param shape: ``(nz, ny, nx)`` of the data block.
    :param mode: MRC mode (a key of :data:`MODE_DTYPES`).
    :param dtype: numpy dtype of the stored values, with the file's byte order.
    :param data_offset: byte offset of the data block (1024 + extended header size).
    :param voxel_size_angstrom: ``(x, y, z)`` sampling ``cella / (mx, my, mz)`` in Å (0 where
        the sampling is unset).
    :param origin_angstrom: ``(x, y, z)`` header origin in Å.
    """

    path: str
    shape: tuple[int, int, int]
    mode: int
    dtype: np.dtype
    data_offset: int
    voxel_size_angstrom: tuple[float, float, float]
    origin_angstrom: tuple[float, float, float]


def _plausible(words: np.ndarray) -> bool:
    nx, ny, nz, mode = (int(v) for v in words[:4])
    return mode in MODE_DTYPES and all(0 < v < 2**24 for v in (nx, ny, nz))


def read_header(path: str | Path) -> MrcHeader:
    """Parse the header of an MRC file permissively (missing ``MAP`` id/stamp are accepted).

    The byte order comes from the machine stamp (``0x44``/``0x41`` little, ``0x11`` big); when the
    stamp is missing, the order that gives a sensible size and mode is used.

    :raises MissingFileError: the file does not exist.
    :raises InputError: the file is shorter than its header says, or has an unsupported mode.
    """
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_BYTES)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: MRC file does not exist") from None
    if len(raw) < HEADER_BYTES:
        raise InputError(
            f"{path}: not an MRC file (only {len(raw)} bytes; an MRC header alone is "
            f"{HEADER_BYTES} bytes)"
        )
    stamp = raw[212]
    if stamp in (0x44, 0x41):
        order = "<"
    elif stamp == 0x11:
        order = ">"
    else:
        order = "<" if _plausible(np.frombuffer(raw, "<i4", 4)) else ">"
    ints = np.frombuffer(raw, f"{order}i4")
    floats = np.frombuffer(raw, f"{order}f4")
    nx, ny, nz, mode = (int(v) for v in ints[:4])
    if mode not in MODE_DTYPES:
        raise InputError(
            f"{path}: unsupported MRC mode {mode} (header word 4); supported modes are "
            "0 (int8), 1 (int16), 2 (float32), 6 (uint16) and 12 (float16)"
        )
    if min(nx, ny, nz) <= 0:
        raise InputError(
            f"{path}: invalid MRC dimensions nx={nx}, ny={ny}, nz={nz} (header words 1-3); "
            "expected positive sizes"
        )
    nsymbt = int(ints[23])
    if nsymbt < 0:
        raise InputError(f"{path}: negative extended header size {nsymbt} (header word 24)")
    dtype = np.dtype(MODE_DTYPES[mode]).newbyteorder(order)
    offset = HEADER_BYTES + nsymbt
    expected = offset + nx * ny * nz * dtype.itemsize
    if size < expected:
        raise InputError(
            f"{path}: file is truncated: {size} bytes, but the header ({nx} x {ny} x {nz}, mode "
            f"{mode}) needs {expected} bytes"
        )
    sampling = [int(v) for v in ints[7:10]]
    cella = [float(v) for v in floats[10:13]]
    # cella is stored as float32: keep 7 significant digits so 1.7 reads back as 1.7.
    voxel = tuple(
        float(f"{c / m:.7g}") if m > 0 and np.isfinite(c) else 0.0 for c, m in zip(cella, sampling)
    )
    origin = tuple(float(v) if np.isfinite(v) else 0.0 for v in floats[49:52])
    return MrcHeader(path, (nz, ny, nx), mode, dtype, offset, voxel, origin)


def _advise_random(data: np.memmap) -> None:
    """Tell the kernel that reads of this map are random (``MADV_RANDOM``): no read-ahead.

    Particles are read in random order. With the default read-ahead every 16 KB image (box 64)
    pulls in 128 KB or more of its neighbours; once the stacks exceed the page cache that waste
    bounds the loader: 170-220 images/s against 2,100-2,700 with this advice (cold random reads
    from 1M box-64 images, docs/benchmarks.md). A no-op where ``madvise`` is unavailable.
    """
    mm = getattr(data, "_mmap", None)
    advice = getattr(mmap, "MADV_RANDOM", None)
    if mm is None or advice is None or not hasattr(mm, "madvise"):
        return
    try:
        mm.madvise(advice)
    except (OSError, ValueError):
        pass


class ImageStack:
    """A lazily memory-mapped stack of square images in an ``.mrcs``/``.mrc`` file.

    Nothing is opened in the constructor; the header is read on first use and the data block
    mapped on the first pixel read. Pickling drops the open map (cheap to send to DataLoader
    workers, which re-open on first access). A 2-D ``.mrc`` is a stack of one image.

    :param path: the MRC file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._header: MrcHeader | None = None
        self._data: np.memmap | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_data"] = None
        return state

    def __repr__(self) -> str:
        return f"ImageStack({self.path!r})"

    @property
    def header(self) -> MrcHeader:
        """Parsed header (read once). Raises :class:`InputError` for non-square images."""
        if self._header is None:
            header = read_header(self.path)
            nz, ny, nx = header.shape
            if ny != nx:
                raise InputError(
                    f"{self.path}: images are not square ({ny} rows x {nx} columns, stack of "
                    f"{nz}); expected square particle images"
                )
            self._header = header
        return self._header

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(N, D, D)``."""
        return self.header.shape

    @property
    def box_size(self) -> int:
        """Image side ``D`` in pixels."""
        return self.header.shape[-1]

    @property
    def pixel_size_angstrom(self) -> float:
        """Pixel size from the header (Å/px; 0 when the header does not set it)."""
        return float(self.header.voxel_size_angstrom[0])

    def __len__(self) -> int:
        return self.header.shape[0]

    @property
    def is_open(self) -> bool:
        """Whether the data block is currently mapped."""
        return self._data is not None

    def _map(self) -> np.memmap:
        if self._data is None:
            h = self.header
            try:
                self._data = np.memmap(
                    self.path, dtype=h.dtype, mode="r", offset=h.data_offset, shape=h.shape
                )
            except FileNotFoundError:
                raise MissingFileError(f"{self.path}: MRC file does not exist") from None
            _advise_random(self._data)
        return self._data

    def close(self) -> None:
        """Drop the memory map (reopened on the next read)."""
        self._data = None

    def read(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Images ``indices`` (0-based, any order) as a ``(len, D, D)`` float32 copy.

        :raises StackIndexError: an index is negative or ``>= len(self)``.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        bad = (idx < 0) | (idx >= n)
        if bad.any():
            raise StackIndexError(
                f"{self.path}: image index {int(idx[bad][0])} (0-based) is outside the stack "
                f"of {n} images"
            )
        return np.array(self._map()[idx], dtype=np.float32)

    def __getitem__(self, index: int) -> np.ndarray:
        """Image ``index`` as ``(D, D)`` float32 (negative indices count from the end)."""
        index = int(index)
        if index < 0:
            index += len(self)
        return self.read(np.array([index]))[0]


class StackCollection:
    """Many stacks by path, with at most ``max_open`` memory maps open (least recently used).

    Headers of all stacks seen stay cached; only maps are closed on eviction. Pickles without
    open maps.

    :param max_open: maximum number of simultaneously mapped stacks.
    """

    def __init__(self, max_open: int = 64) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = int(max_open)
        self._stacks: dict[str, ImageStack] = {}
        self._open: OrderedDict[str, None] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # the ImageStacks themselves pickle without their maps
        return state

    def __len__(self) -> int:
        return len(self._stacks)

    def get(self, path: str | Path) -> ImageStack:
        """The :class:`ImageStack` for ``path`` (created on first use; not opened here)."""
        key = str(path)
        stack = self._stacks.get(key)
        if stack is None:
            stack = self._stacks[key] = ImageStack(key)
        return stack

    def _touch(self, key: str) -> None:
        self._open[key] = None
        self._open.move_to_end(key)
        while len(self._open) > self.max_open:
            old, _ = self._open.popitem(last=False)
            self._stacks[old].close()

    def read_many(self, path: str | Path, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Images ``indices`` of stack ``path`` as ``(len, D, D)`` float32."""
        stack = self.get(path)
        out = stack.read(indices)
        self._touch(stack.path)
        return out

    def read(self, path: str | Path, index: int) -> np.ndarray:
        """Image ``index`` (0-based) of stack ``path`` as ``(D, D)`` float32."""
        return self.read_many(path, np.array([int(index)]))[0]

    def close(self) -> None:
        """Close all open maps."""
        for key in self._open:
            self._stacks[key].close()
        self._open.clear()


def read_volume(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a cubic volume.

    :return: ``(volume (D, D, D) float32 indexed [z, y, x], voxel size in Å)`` (the voxel size is
        the header's x sampling; 0 when unset).
    :raises InputError: the map is not a cube.
    """
    header = read_header(path)
    nz, ny, nx = header.shape
    if not nz == ny == nx:
        raise InputError(
            f"{path}: volume is {nz} x {ny} x {nx} (z, y, x); expected a cube (D, D, D)"
        )
    count = nz * ny * nx
    with open(header.path, "rb") as fh:
        fh.seek(header.data_offset)
        data = np.fromfile(fh, dtype=header.dtype, count=count)
    volume = data.reshape(header.shape).astype(np.float32)
    return volume, float(header.voxel_size_angstrom[0])


def write_volume(
    path: str | Path,
    volume: np.ndarray,
    voxel_size_angstrom: float,
    origin_angstrom: Sequence[float] | None = None,
) -> Path:
    """Write a ``(D, D, D)`` volume (indexed ``[z, y, x]``) as float32 (mode 2), atomically.

    :param voxel_size_angstrom: header voxel size (Å).
    :param origin_angstrom: header origin ``(x, y, z)`` in Å (default 0).
    :return: ``path``.
    """
    data = np.ascontiguousarray(np.asarray(volume), dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"{path}: a volume must be 3-D (z, y, x), got shape {data.shape}")
    origin = (
        (0.0, 0.0, 0.0) if origin_angstrom is None else tuple(float(v) for v in origin_angstrom)
    )
    if len(origin) != 3:
        raise ValueError(f"{path}: origin_angstrom must have 3 values (x, y, z), got {origin}")

    def _write(tmp: Path) -> None:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.set_volume()
            mrc.voxel_size = float(voxel_size_angstrom)
            mrc.header.origin = origin
            mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0

    return atomic_write(path, _write)


def write_stack(path: str | Path, images: np.ndarray, pixel_size_angstrom: float) -> Path:
    """Write ``(N, D, D)`` images (indexed ``[n, y, x]``) as a float32 (mode 2) stack, atomically.

    :param pixel_size_angstrom: header pixel size (Å/px).
    :return: ``path``.
    """
    data = np.asarray(images)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"{path}: an image stack must be (N, D, D), got shape {data.shape}")
    data = np.ascontiguousarray(data, dtype=np.float32)

    def _write(tmp: Path) -> None:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size_angstrom)

    return atomic_write(path, _write)
