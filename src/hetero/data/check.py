"""Scan a whole particle data set for what would stop or spoil a training run, without training.

``python -m hetero.data.check <particles> [--datadir D] [--csv bad.csv]`` reads the particle
file (``.star``, ``.cs``, ``.mrcs``, ``.txt``), then checks every stack it references and every
image in them:

* missing stacks (with how many particles reference each);
* stacks whose images are not square or whose box differs from the particle file's;
* image indices beyond the end of their stack;
* images with NaN or inf pixels (each listed with its particle row, stack and 1-based index);
* constant images (e.g. all zero: no signal; reported, not an error).

Exit status 0 when nothing stops training, 1 when something does, 2 when the particle file
itself cannot be read. Stacks are memory-mapped and scanned in chunks, so memory stays at a few
chunks of images whatever the data set's size; speed is bounded by the disk.

The same scan (:func:`scan_images`) is what ``data.drop_nonfinite=true`` runs at setup.

Example usage::

    python -m hetero.data.check Refine3D/job012/run_data.star --csv damaged.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hetero.data.io.errors import InputError
from hetero.data.io.mrc import ImageStack
from hetero.data.particles import ParticleTable

__all__ = ["BadImage", "StackProblem", "drop_damaged", "scan_images", "scan_stacks", "main"]


@dataclass(frozen=True)
class BadImage:
    """One damaged or empty image: table ``row`` (0-based), its stack and 0-based ``index``."""

    row: int
    stack: str
    index: int
    problem: str  # "NaN", "inf", "NaN and inf" or "constant"

    def describe(self, source: str = "") -> str:
        return (
            f"particle row {self.row + 1}{f' of {source}' if source else ''}: image "
            f"{self.index + 1}@{self.stack} holds {self.problem} pixel values"
            if self.problem != "constant"
            else f"particle row {self.row + 1}: image {self.index + 1}@{self.stack} is constant"
        )


@dataclass(frozen=True)
class StackProblem:
    """A stack that cannot be read as the particle file says (``problem`` says why)."""

    stack: str
    n_particles: int
    problem: str


def _groups(table: ParticleTable) -> tuple[np.ndarray, list[str]]:
    codes, uniques = pd.factorize(pd.Series(table.image_paths, dtype=object))
    return codes, [str(u) for u in uniques]


def scan_stacks(table: ParticleTable) -> list[StackProblem]:
    """Headers only: every stack exists, is square, has the table's box and holds its images."""
    codes, stacks = _groups(table)
    counts = np.bincount(codes, minlength=len(stacks))
    top = np.full(len(stacks), -1, dtype=np.int64)
    np.maximum.at(top, codes, table.image_indices)
    problems = []
    for code, path in enumerate(stacks):
        n = int(counts[code])
        if not Path(path).is_file():
            problems.append(StackProblem(path, n, "missing"))
            continue
        try:
            shape = ImageStack(path).shape
        except InputError as err:
            problems.append(StackProblem(path, n, f"unreadable: {err}"))
            continue
        if shape[-1] != table.box_size:
            problems.append(StackProblem(
                path, n, f"images are {shape[-1]} x {shape[-1]} px but the particle file says "
                f"box {table.box_size}"))
        if int(top[code]) >= shape[0]:
            problems.append(StackProblem(
                path, n, f"holds {shape[0]} images but image {int(top[code]) + 1} (1-based) is "
                "referenced"))
    return problems


def scan_images(
    table: ParticleTable,
    chunk: int = 256,
    skip_stacks: set[str] | None = None,
    constant: bool = False,
    progress=None,
) -> list[BadImage]:
    """Read every image of ``table`` once and return the damaged ones, in table order.

    :param chunk: images read and tested at once per stack (memory ``chunk * D^2 * 4`` bytes).
    :param skip_stacks: stacks not to read (e.g. missing ones found by :func:`scan_stacks`).
    :param constant: also report constant images (``problem="constant"``).
    :param progress: optional ``callable(images_done, images_total)``.
    :raises InputError: a stack cannot be read (run :func:`scan_stacks` first to list them all).
    """
    codes, stacks = _groups(table)
    skip = skip_stacks or set()
    order = np.lexsort((table.image_indices, codes))  # by stack, then image index
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    bad: list[BadImage] = []
    done, total = 0, len(table)
    for rows in np.split(order, bounds) if len(order) else []:
        path = stacks[codes[rows[0]]]
        if path in skip:
            done += len(rows)
            continue
        stack = ImageStack(path)
        try:
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                images = stack.read(table.image_indices[part])
                nan = np.isnan(images).any(axis=(1, 2))
                inf = np.isinf(images).any(axis=(1, 2))
                for i in np.flatnonzero(nan | inf).tolist():
                    kind = " and ".join(k for k, f in (("NaN", nan[i]), ("inf", inf[i])) if f)
                    bad.append(BadImage(int(part[i]), path, int(table.image_indices[part[i]]), kind))
                if constant:
                    flat = images.reshape(len(part), -1)
                    same = (flat == flat[:, :1]).all(axis=1) & ~(nan | inf)
                    for i in np.flatnonzero(same).tolist():
                        bad.append(BadImage(int(part[i]), path, int(table.image_indices[part[i]]),
                                            "constant"))
                done += len(part)
                if progress is not None:
                    progress(done, total)
        finally:
            stack.close()
    bad.sort(key=lambda b: b.row)
    return bad


def write_bad_csv(path: str | Path, bad: list[BadImage], source: str = "") -> Path:
    """``row`` (1-based particle row), ``stack``, ``image`` (1-based), ``problem``, ``source``."""
    from hetero.utils.files import atomic_write

    def write(p: Path) -> None:
        with open(p, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["row", "stack", "image", "problem", "source"])
            for b in bad:
                w.writerow([b.row + 1, b.stack, b.index + 1, b.problem, source])

    return atomic_write(path, write)


def read_bad_csv(path: str | Path) -> list[BadImage]:
    """The list :func:`write_bad_csv` wrote (rows back to 0-based)."""
    with open(path, newline="") as fh:
        return [
            BadImage(int(r["row"]) - 1, r["stack"], int(r["image"]) - 1, r["problem"])
            for r in csv.DictReader(fh)
        ]


def drop_damaged(table: ParticleTable, dropped_file: str | Path | None = None) -> tuple[ParticleTable, np.ndarray]:
    """``data.drop_nonfinite``: ``table`` without the particles whose image holds NaN/inf.

    Scans every image (:func:`scan_images`), or reuses ``dropped_file`` when it exists and
    matches the table (same stack and image for every listed row: a resumed run, the analysis);
    logs each dropped particle and writes the list to ``dropped_file`` after a scan.

    :return: ``(filtered table, dropped rows)``; the filtered table's ``extra["input_rows"]``
        maps its rows back to the input's (0-based).
    :raises InputError: every image is damaged.
    """
    from hetero.utils.pylogger import RankedLogger

    log = RankedLogger(__name__)
    bad: list[BadImage] | None = None
    path = Path(dropped_file) if dropped_file else None
    if path is not None and path.is_file():
        saved = read_bad_csv(path)
        if all(0 <= b.row < len(table) and str(table.image_paths[b.row]) == b.stack
               and int(table.image_indices[b.row]) == b.index for b in saved):
            bad = saved
            log.info(f"Reusing the list of {len(bad)} dropped particles in {path}")
        else:
            log.warning(f"{path} does not match {table.source}; scanning the images again")
    if bad is None:
        start = time.perf_counter()
        log.info(f"data.drop_nonfinite: scanning all {len(table)} images for NaN/inf pixels")
        bad = scan_images(table)
        log.info(f"Scanned {len(table)} images in {time.perf_counter() - start:.1f} s")
        if path is not None:
            write_bad_csv(path, bad, table.source)
    for b in bad:
        log.warning(f"Dropping {b.describe(table.source)}")
    rows = np.array([b.row for b in bad], dtype=np.int64)
    if len(rows) == 0:
        return table, rows
    if len(rows) == len(table):
        raise InputError(f"{table.source}: every image holds NaN or inf pixel values")
    keep = np.setdiff1d(np.arange(len(table)), rows)
    filtered = table.subset(keep)
    filtered.extra["input_rows"] = keep
    log.warning(
        f"data.drop_nonfinite: left out {len(rows)} of {len(table)} particles (listed in "
        f"{path or 'the log'}); training, latents and subsets use the other {len(keep)}"
    )
    return filtered, rows


def _read_table(args) -> ParticleTable:
    """The particle table without the stack checks (those are what this tool reports)."""
    path = Path(args.particles)
    suffix = path.suffix.lower()
    if suffix in (".star", ".cs") and path.is_file():
        if suffix == ".star":
            from hetero.data.io.star import read_star

            return read_star(path, datadir=args.datadir, pixel_size_angstrom=args.apix)
        from hetero.data.io.cryosparc import read_cs

        return read_cs(path, datadir=args.datadir)
    from hetero.data.io.readers import read_particles

    return read_particles(path, datadir=args.datadir, poses=args.poses, ctf=args.ctf,
                          pixel_size_angstrom=args.apix)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hetero.data.check",
        description="Check every stack and image of a particle data set (no training).")
    p.add_argument("particles", help=".star, .cs, .mrcs or .txt particle file")
    p.add_argument("--datadir", default=None, help="folder holding the stacks if they were moved")
    p.add_argument("--poses", default=None, help="cryoDRGN pose pickle (.mrcs/.txt inputs)")
    p.add_argument("--ctf", default=None, help="cryoDRGN CTF pickle (.mrcs/.txt inputs)")
    p.add_argument("--apix", type=float, default=None, help="pixel size (Å) if the file has none")
    p.add_argument("--csv", default=None, help="write every damaged image to this CSV file")
    p.add_argument("--list", type=int, default=20, help="damaged images to print (default 20)")
    p.add_argument("--chunk", type=int, default=256, help="images read at once per stack")
    args = p.parse_args(argv)

    start = time.perf_counter()
    try:
        table = _read_table(args)
    except (InputError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    source = table.source or args.particles
    print(f"{source}: {len(table)} particles in {len(table.stacks)} stacks, box {table.box_size} px")
    problems = scan_stacks(table)
    for sp in problems:
        print(f"  stack {sp.stack} ({sp.n_particles} particles): {sp.problem}")
    unreadable = {sp.stack for sp in problems}  # their images cannot be read as the file says
    bad = scan_images(table, chunk=args.chunk, skip_stacks=unreadable, constant=True)
    damaged = [b for b in bad if b.problem != "constant"]
    blank = [b for b in bad if b.problem == "constant"]
    for b in damaged[: args.list]:
        print(f"  {b.describe()}")
    if len(damaged) > args.list:
        print(f"  ... and {len(damaged) - args.list} more (--csv FILE lists all)")
    if blank:
        rows = ", ".join(str(b.row + 1) for b in blank[:10])
        print(f"  {len(blank)} constant (empty) images, particle rows {rows}"
              f"{' ...' if len(blank) > 10 else ''}: no signal, harmless to training")
    if args.csv:
        write_bad_csv(args.csv, damaged, source)
        print(f"  damaged images written to {args.csv}")
    seconds = time.perf_counter() - start
    n_read = len(table) - sum(sp.n_particles for sp in problems if sp.stack in unreadable)
    print(f"Scanned {n_read} images in {seconds:.1f} s; {len(damaged)} with NaN/inf, "
          f"{len(problems)} stack problem(s).")
    if damaged or problems:
        print("To train anyway: fix or remove what is listed, or pass data.drop_nonfinite=true "
              "to leave out the images with NaN/inf.")
        return 1
    print("OK: nothing here stops training.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
