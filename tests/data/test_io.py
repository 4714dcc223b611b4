"""Particle readers/writers: MRC stacks, RELION STAR, cryoSPARC .cs, cryoDRGN pickles.

Real files from RELION/cryoSPARC/cryoDRGN come from the ``conformance_dir`` fixture (skipped
when absent); everything written goes to ``tmp_path``.
"""

from __future__ import annotations

import os
import pickle
import shutil
from contextlib import nullcontext
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from hetero.data.io import (
    ImageStack,
    InputError,
    MissingFileError,
    StackCollection,
    StackIndexError,
    read_cryodrgn_ctf,
    read_cryodrgn_poses,
    read_cs,
    read_particles,
    read_star,
    read_volume,
    safe_load_pickle,
    validate_pixels,
    write_stack,
    write_star,
    write_volume,
)
from hetero.data.io.cryosparc import rotvec_to_matrix
from hetero.data.particles import ParticleTable
from hetero.physics.ctf import CTF_COLUMNS
from hetero.physics.projection import project_real
from hetero.physics.rotations import random_rotations

CS_FILE = "cryosparc_P12_J24_001_particles.cs"


def _write_mrc(path: Path, data: np.ndarray, voxel: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = voxel
    return path


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (relative path -> bytes, mtime)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _rotation_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


# -- MRC stacks and volumes ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "dtype"),
    [(0, np.int8), (1, np.int16), (2, np.float32), (6, np.uint16), (12, np.float16)],
)
def test_stack_modes_round_trip(tmp_path, mode, dtype):
    rng = np.random.default_rng(mode)
    data = rng.integers(0, 100, size=(4, 6, 6)).astype(dtype)
    path = _write_mrc(tmp_path / f"m{mode}.mrcs", data, voxel=1.25)
    with mrcfile.open(path) as m:
        assert int(m.header.mode) == mode
    stack = ImageStack(path)
    assert stack.shape == (4, 6, 6) and len(stack) == 4 and stack.box_size == 6
    assert stack.pixel_size_angstrom == pytest.approx(1.25)
    out = stack.read(np.array([3, 0, 2]))
    assert out.dtype == np.float32 and out.shape == (3, 6, 6)
    np.testing.assert_array_equal(out, data[[3, 0, 2]].astype(np.float32))
    np.testing.assert_array_equal(stack[1], data[1].astype(np.float32))
    np.testing.assert_array_equal(stack[-1], data[3].astype(np.float32))


def test_single_image_and_pickling(tmp_path):
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    stack = ImageStack(_write_mrc(tmp_path / "one.mrc", image))
    assert stack.shape == (1, 8, 8)
    np.testing.assert_array_equal(stack[0], image)  # [y, x] as stored
    assert stack.is_open
    clone = pickle.loads(pickle.dumps(stack))
    assert not clone.is_open and stack.is_open  # the map is not shipped
    np.testing.assert_array_equal(clone[0], image)


def test_stack_collection_lru(tmp_path):
    paths = [
        _write_mrc(tmp_path / f"s{i}.mrcs", np.full((2, 4, 4), i, np.float32)) for i in range(3)
    ]
    coll = StackCollection(max_open=2)
    for i, p in enumerate(paths):
        assert coll.read(p, 1)[0, 0] == i
    assert not coll.get(paths[0]).is_open and coll.get(paths[2]).is_open
    assert coll.read_many(paths[0], [0, 1]).shape == (2, 4, 4)
    clone = pickle.loads(pickle.dumps(coll))
    assert clone.read(paths[1], 0)[0, 0] == 1


def test_conformance_stacks_read_permissively(conformance_dir):
    expected = {"toy_projections.mrcs": 1000, "hand.mrcs": 100, "relion31.mrcs": 5}
    for name, count in expected.items():
        stack = ImageStack(conformance_dir / name)
        assert len(stack) == count
        idx = np.array([0, count - 1, 2])
        # mrcfile warns about the missing MAP id / machine stamp of two of them.
        with pytest.warns(RuntimeWarning) if name != "hand.mrcs" else nullcontext():
            ref = mrcfile.mmap(conformance_dir / name, permissive=True)
        np.testing.assert_array_equal(stack.read(idx), np.asarray(ref.data[idx]))
        ref.close()


def test_volume_and_stack_writers(tmp_path, conformance_dir):
    vol, apix = read_volume(conformance_dir / "hand-vol.mrc")
    assert vol.shape == (64, 64, 64) and vol.dtype == np.float32 and apix == 1.0
    out = write_volume(tmp_path / "v.mrc", vol, 2.5, origin_angstrom=(1.0, 2.0, 3.0))
    back, voxel = read_volume(out)
    np.testing.assert_array_equal(back, vol)
    assert voxel == 2.5
    with mrcfile.open(out) as m:  # strict mrcfile accepts what we write
        assert tuple(float(v) for v in m.header.origin.item()) == (1.0, 2.0, 3.0)
        assert int(m.header.mode) == 2
    write_volume(tmp_path / "v0.mrc", vol, 2.5)
    with mrcfile.open(tmp_path / "v0.mrc") as m:
        assert tuple(float(v) for v in m.header.origin.item()) == (0.0, 0.0, 0.0)
    images = np.random.default_rng(0).standard_normal((3, 16, 16)).astype(np.float64)
    write_stack(tmp_path / "s.mrcs", images, 1.7)
    stack = ImageStack(tmp_path / "s.mrcs")
    assert stack.shape == (3, 16, 16) and stack.pixel_size_angstrom == 1.7
    np.testing.assert_array_equal(stack.read(np.arange(3)), images.astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mrcs", "v.mrc", "v0.mrc"]  # no temps


def _raw_mrc(path: Path, data: np.ndarray, order: str, stamp: bytes, apix: float) -> Path:
    """A hand-made MRC file with byte order ``order`` and machine stamp ``stamp``."""
    nz, ny, nx = data.shape
    ints = np.zeros(256, dtype=f"{order}i4")
    ints[:4] = [nx, ny, nz, 2]
    ints[7:10] = [nx, ny, nz]
    ints[16:19] = [1, 2, 3]
    header = bytearray(ints.tobytes())
    header[40:52] = np.array([nx * apix, ny * apix, nz * apix], f"{order}f4").tobytes()
    header[212:216] = stamp
    path.write_bytes(bytes(header) + data.astype(f"{order}f4").tobytes())
    return path


@pytest.mark.parametrize(
    ("order", "stamp"), [(">", b"\x11\x11\x00\x00"), (">", b"\x00" * 4), ("<", b"\x00" * 4)]
)
def test_byte_order_and_missing_stamp(tmp_path, order, stamp):
    data = np.random.default_rng(0).standard_normal((3, 5, 5)).astype(np.float32)
    stack = ImageStack(_raw_mrc(tmp_path / "raw.mrcs", data, order, stamp, 1.5))
    assert stack.shape == (3, 5, 5) and stack.pixel_size_angstrom == 1.5
    np.testing.assert_array_equal(stack.read(np.arange(3)), data)


def test_stack_errors(tmp_path):
    rect = _write_mrc(tmp_path / "rect.mrcs", np.zeros((2, 4, 6), np.float32))
    with pytest.raises(InputError, match=r"rect\.mrcs.*not square.*4 rows x 6 columns"):
        _ = ImageStack(rect).shape
    ok = _write_mrc(tmp_path / "ok.mrcs", np.zeros((3, 4, 4), np.float32))
    with pytest.raises(StackIndexError, match=r"ok\.mrcs: image index 3 .* stack of 3 images"):
        ImageStack(ok).read([0, 3])
    with pytest.raises(IndexError):
        ImageStack(ok)[5]
    truncated = tmp_path / "cut.mrcs"
    truncated.write_bytes(ok.read_bytes()[:-10])
    with pytest.raises(InputError, match=r"cut\.mrcs: file is truncated"):
        _ = ImageStack(truncated).shape
    with pytest.raises(MissingFileError, match=r"nope\.mrcs"):
        _ = ImageStack(tmp_path / "nope.mrcs").shape
    with pytest.raises(InputError, match="expected a cube"):
        read_volume(ok)


# -- RELION STAR ------------------------------------------------------------------------------------
def test_relion31_star(conformance_dir):
    """RELION 3.1: 5 particles, 256 px at rlnImagePixelSize = 2.806 Å.

    The optics table also has ``rlnMicrographOriginalPixelSize = 1.403`` (the micrograph pixel
    size; particles were extracted binned by 2). RELION's image pixel size is
    ``rlnImagePixelSize``, so origins in Å are divided by 2.806, not 1.403.
    """
    star = conformance_dir / "relion31.star"
    table = read_star(star)
    assert len(table) == 5 and table.box_size == 256
    np.testing.assert_allclose(table.pixel_size_angstrom, 2.806)
    rows = table.rows
    np.testing.assert_allclose(
        table.origins_px, rows[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 2.806
    )
    assert table.image_paths[0] == str(conformance_dir / "relion31.mrcs")
    np.testing.assert_array_equal(table.image_indices, np.arange(5))
    np.testing.assert_array_equal(table.half_set, np.zeros(5))  # rlnRandomSubset 1
    assert table.ctf.shape == (5, len(CTF_COLUMNS))
    np.testing.assert_allclose(table.ctf[:, 0], rows["rlnDefocusU"])
    np.testing.assert_allclose(table.ctf[:, 2], rows["rlnDefocusAngle"])
    np.testing.assert_allclose(table.ctf[0, 3:6], [300.0, 0.01, 0.1])  # from data_optics
    np.testing.assert_allclose(table.ctf[:, 8], 1.0)
    assert table.optics is not None and table.extra["star_version"] == "3.1"
    det = np.linalg.det(table.rotations)
    np.testing.assert_allclose(det, 1.0, atol=1e-12)
    full = read_particles(star)  # stacks exist, indices within them
    assert len(full) == 5


def test_relion31_datadir_remap(tmp_path, conformance_dir):
    """Image names pointing into a RELION project (Extract/job133/...) map via datadir/basename."""
    text = (conformance_dir / "relion31.star").read_text()
    moved = text.replace("@relion31.mrcs", "@Extract/job133/Micrographs/relion31.mrcs")
    assert moved != text
    star = tmp_path / "moved.star"
    star.write_text(moved)
    with pytest.raises(MissingFileError, match=r"Extract/job133/Micrographs/relion31\.mrcs"):
        read_particles(star)
    table = read_particles(star, datadir=conformance_dir)
    assert set(table.image_paths) == {str(conformance_dir / "relion31.mrcs")}
    assert len(table) == 5 and table.box_size == 256
    np.testing.assert_allclose(table.pixel_size_angstrom, 2.806)
    assert table.origins_px[0, 0] == pytest.approx(0.019324 / 2.806)


def test_toy_star_relion30(conformance_dir):
    star = conformance_dir / "toy_projections.star"
    with pytest.raises(InputError, match="rlnImagePixelSize"):
        read_star(star)
    table = read_particles(star, pixel_size_angstrom=1.0)
    assert len(table) == 1000 and table.box_size == 30
    assert table.rotations is None  # the star has no angle columns
    assert table.extra["star_version"] == "3.0" and table.optics is None
    np.testing.assert_allclose(table.ctf[0], [0, 0, 0, 300, 0.001, 0.1, 90, 0, 1])
    assert table.image_indices[-1] == 999
    with pytest.raises(InputError, match="pixel_size_angstrom=2.0"):
        read_star(conformance_dir / "relion31.star", pixel_size_angstrom=2.0)


def _star(tmp_path: Path, body: str, name: str = "p.star") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


OPTICS = """
data_optics

loop_
_rlnOpticsGroup
_rlnImagePixelSize
_rlnImageSize
_rlnVoltage
_rlnSphericalAberration
_rlnAmplitudeContrast
1 2.0 8 300 2.7 0.1
"""


def test_star_errors(tmp_path):
    stack = _write_mrc(tmp_path / "st.mrcs", np.zeros((3, 8, 8), np.float32))
    assert stack.exists()
    head = OPTICS + "\ndata_particles\n\nloop_\n"
    no_name = _star(tmp_path, head + "_rlnDefocusU\n_rlnOpticsGroup\n100 1\n")
    with pytest.raises(InputError, match=r"no_name|p\.star.*rlnImageName"):
        read_star(no_name)
    no_v = _star(tmp_path, head + "_rlnImageName\n_rlnDefocusU\n1@st.mrcs 100\n")
    with pytest.raises(InputError, match=r"p\.star: column rlnDefocusV is missing"):
        read_star(no_v)
    bad_name = _star(tmp_path, head + "_rlnImageName\n1@st.mrcs\nst.mrcs\n")
    with pytest.raises(InputError, match=r"p\.star, line 18 \(data_particles row 2\).*'st\.mrcs'"):
        read_star(bad_name)
    bad_value = _star(
        tmp_path, head + "_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n1@st.mrcs abc 100\n"
    )
    with pytest.raises(
        InputError, match=r"line 19 \(data_particles row 1\): column rlnDefocusU holds 'abc'"
    ):
        read_star(bad_value)
    empty = _star(tmp_path, head + "_rlnImageName\n")
    with pytest.raises(InputError, match="contains no particles"):
        read_star(empty)
    mixed = OPTICS.replace("1 2.0 8 300 2.7 0.1", "1 2.0 8 300 2.7 0.1\n2 2.0 16 300 2.7 0.1")
    mixed = _star(
        tmp_path,
        mixed + "\ndata_particles\n\nloop_\n_rlnImageName\n_rlnOpticsGroup\n"
        "1@st.mrcs 1\n2@st.mrcs 2\n",
    )
    with pytest.raises(InputError, match="different image sizes"):
        read_star(mixed)
    subset = _star(tmp_path, head + "_rlnImageName\n_rlnRandomSubset\n1@st.mrcs 3\n")
    with pytest.raises(InputError, match="rlnRandomSubset is 3; expected 1 or 2"):
        read_star(subset)
    angles = _star(tmp_path, head + "_rlnImageName\n_rlnAngleRot\n1@st.mrcs 3\n")
    with pytest.raises(InputError, match="rlnAngleTilt is missing"):
        read_star(angles)
    beyond = _star(tmp_path, head + "_rlnImageName\n1@st.mrcs\n4@st.mrcs\n")
    with pytest.raises(InputError, match=r"st\.mrcs: image index 3 .*holds only 3 images"):
        read_particles(beyond)
    missing = _star(tmp_path, head + "_rlnImageName\n1@gone/st.mrcs\n")
    with pytest.raises(MissingFileError, match=r"gone/st\.mrcs"):
        read_particles(missing)
    with pytest.raises(MissingFileError, match=r"absent\.star"):
        read_particles(tmp_path / "absent.star")
    with pytest.raises(InputError, match="unknown particle file type"):
        read_particles(_star(tmp_path, "", "x.csv"))


def test_star_30_pixel_size_columns(tmp_path):
    _write_mrc(tmp_path / "st.mrcs", np.zeros((3, 8, 8), np.float32))
    body = (
        "data_\n\nloop_\n_rlnImageName\n_rlnDetectorPixelSize\n_rlnMagnification\n"
        "_rlnOriginX\n_rlnOriginY\n_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n"
        "2@st.mrcs 14.0 50000 1.5 -2.0 10 20 30\n"
    )
    table = read_particles(_star(tmp_path, body))
    np.testing.assert_allclose(table.pixel_size_angstrom, 2.8)  # 14 µm / 50000 -> 2.8 Å
    np.testing.assert_allclose(table.origins_px, [[1.5, -2.0]])  # 3.0 origins are pixels
    assert table.image_indices.tolist() == [1] and table.ctf is None


# -- writing STAR ------------------------------------------------------------------------------------
def test_write_star_subset_round_trip(tmp_path, conformance_dir):
    before = _snapshot(conformance_dir)
    star = conformance_dir / "relion31.star"
    table = read_star(star)
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_star(star, table)
    sub = [4, 1, 3]
    out = write_star(tmp_path / "sub.star", table, indices=sub)
    back = read_particles(out)  # opens where it is written, no datadir
    absolute = os.path.abspath(conformance_dir / "relion31.mrcs")  # RELION resolves against its cwd
    assert back.rows["rlnImageName"].tolist() == [f"{i + 1:06d}@{absolute}" for i in sub]
    pd.testing.assert_frame_equal(back.optics, table.optics)
    assert _rotation_error(back.rotations, table.rotations[sub]) < 1e-6
    np.testing.assert_allclose(back.origins_px, table.origins_px[sub], atol=1e-9)
    np.testing.assert_allclose(back.ctf, table.ctf[sub])
    assert back.image_paths.tolist() == table.image_paths[sub].tolist()
    assert _snapshot(conformance_dir) == before  # inputs untouched


def _array_table(tmp_path: Path) -> ParticleTable:
    paths = []
    for s in range(2):
        paths.append(
            str(_write_mrc(tmp_path / "stacks" / f"s{s}.mrcs", np.zeros((5, 8, 8), np.float32)))
        )
    n = 10
    rng = np.random.default_rng(0)
    rot = random_rotations(n, generator=torch.Generator().manual_seed(0)).double().numpy()
    ctf = np.tile([12000.0, 11000.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0], (n, 1))
    ctf[:, 0] += rng.uniform(0, 5000, n)
    ctf[5:, 3] = 200.0  # a second optics group
    return ParticleTable(
        image_paths=np.repeat(paths, 5),
        image_indices=np.tile(np.arange(5), 2),
        box_size=8,
        pixel_size_angstrom=np.full(n, 1.5),
        rotations=rot,
        origins_px=rng.uniform(-3, 3, (n, 2)),
        ctf=ctf,
        half_set=(np.arange(n) % 2).astype(np.int8),
        source="synthetic",
    )


def test_write_star_from_arrays_round_trip(tmp_path):
    table = _array_table(tmp_path)
    out = write_star(tmp_path / "out" / "built.star", table)
    text = out.read_text()
    assert "data_optics" in text and f"000005@{tmp_path / 'stacks' / 's1.mrcs'}" in text  # absolute
    beside = write_star(tmp_path / "stacks" / "built.star", table)  # hetero's own stacks: relative
    assert "000005@s1.mrcs" in beside.read_text()
    back = read_particles(out)
    assert back.extra["star_version"] == "3.1"
    assert back.image_paths.tolist() == table.image_paths.tolist()
    np.testing.assert_array_equal(back.image_indices, table.image_indices)
    assert _rotation_error(back.rotations, table.rotations) < 1e-6
    np.testing.assert_allclose(back.origins_px, table.origins_px, atol=1e-9)
    np.testing.assert_allclose(back.ctf, table.ctf, atol=1e-6)
    np.testing.assert_array_equal(back.half_set, table.half_set)
    assert back.optics_group.tolist() == [1] * 5 + [2] * 5
    np.testing.assert_allclose(back.pixel_size_angstrom, 1.5)
    with mrcfile.open(table.image_paths[0]):  # stacks untouched and valid
        pass


def test_write_star_from_relion30_rows(tmp_path, conformance_dir):
    table = read_star(conformance_dir / "toy_projections.star", pixel_size_angstrom=1.0)
    out = write_star(tmp_path / "toy31.star", table, indices=np.arange(10))
    back = read_particles(out)
    assert back.extra["star_version"] == "3.1"
    assert back.image_paths.tolist() == table.image_paths[:10].tolist()
    assert "dummyVariable" in back.rows.columns  # extra columns kept
    assert "rlnVoltage" not in back.rows.columns  # moved to data_optics
    np.testing.assert_allclose(back.ctf, table.ctf[:10])
    np.testing.assert_allclose(back.pixel_size_angstrom, 1.0)


# -- cryoSPARC ---------------------------------------------------------------------------------------
def test_cryosparc_conformance(conformance_dir):
    raw = np.load(conformance_dir / CS_FILE, allow_pickle=False)
    table = read_cs(conformance_dir / CS_FILE)
    n = len(raw)
    assert len(table) == n and table.box_size == 180
    np.testing.assert_allclose(table.pixel_size_angstrom, 2.95)
    assert table.rotations.shape == (n, 3, 3) and table.origins_px.shape == (n, 2)
    rot = table.rotations
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-12)
    np.testing.assert_allclose(
        rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-12
    )
    # A = expm([w]_x).T, with expm checked against torch's matrix exponential.
    w = torch.from_numpy(raw["alignments3D/pose"].astype(np.float64))
    zero = torch.zeros_like(w[:, 0])
    skew = torch.stack(
        [
            torch.stack([zero, -w[:, 2], w[:, 1]], -1),
            torch.stack([w[:, 2], zero, -w[:, 0]], -1),
            torch.stack([-w[:, 1], w[:, 0], zero], -1),
        ],
        -2,
    )
    np.testing.assert_allclose(
        rot, torch.linalg.matrix_exp(skew).transpose(1, 2).numpy(), atol=1e-12
    )
    np.testing.assert_allclose(table.origins_px, raw["alignments3D/shift"])
    np.testing.assert_allclose(table.ctf[:, 0], raw["ctf/df1_A"], rtol=1e-6)
    np.testing.assert_allclose(table.ctf[:, 2], np.rad2deg(raw["ctf/df_angle_rad"]), rtol=1e-6)
    np.testing.assert_allclose(table.ctf[0, 3:6], [200.0, 2.0, 0.07])
    np.testing.assert_array_equal(table.half_set, raw["alignments3D/split"])
    np.testing.assert_array_equal(table.image_indices, raw["blob/idx"])
    assert all(Path(p).is_absolute() and "J19/extract" in p for p in table.stacks)
    assert table.image_indices.max() < 1000 and len(table.stacks) == 50


def _save_cs(path: Path, records: np.ndarray) -> Path:
    with open(path, "wb") as fh:  # np.save(path) would append .npy
        np.save(fh, records)
    return path


def test_cryosparc_synthetic(tmp_path):
    stack = _write_mrc(tmp_path / "data" / "J3" / "p.mrcs", np.zeros((4, 8, 8), np.float32))
    dtype = [
        ("blob/path", "S20"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
    ]
    rec = np.zeros(2, dtype=dtype)
    rec["blob/path"] = b">J3/p.mrcs"
    rec["blob/idx"] = [3, 0]
    rec["blob/shape"] = 8
    rec["blob/psize_A"] = 1.1
    (tmp_path / "proj" / "J4").mkdir(parents=True)
    cs = _save_cs(tmp_path / "proj" / "J4" / "x.cs", rec)
    table = read_particles(cs, datadir=tmp_path / "data")
    assert table.image_paths.tolist() == [str(stack)] * 2
    assert table.image_indices.tolist() == [3, 0]
    assert table.rotations is None and table.ctf is None
    assert table.pixel_size_angstrom.tolist() == [1.1, 1.1]
    bad = _save_cs(tmp_path / "bad.cs", np.zeros(2, dtype=[("blob/path", "S4"), ("uid", "<u8")]))
    with pytest.raises(
        InputError, match=r"bad\.cs: missing field\(s\) blob/idx; fields found: blob/path, uid"
    ):
        read_cs(bad)
    ctf_dtype = dtype + [("ctf/df1_A", "<f4")]
    with_ctf = np.zeros(2, dtype=ctf_dtype)
    for name in rec.dtype.names:
        with_ctf[name] = rec[name]
    partial = _save_cs(tmp_path / "ctf.cs", with_ctf)
    with pytest.raises(InputError, match=r"ctf/df2_A.*ctf fields found: ctf/df1_A"):
        read_cs(partial)
    w = np.random.default_rng(1).normal(size=(50, 3))
    w[0] = 0.0
    w[1] = 1e-10
    mats = rotvec_to_matrix(w)
    np.testing.assert_allclose(np.linalg.det(mats), 1.0, atol=1e-12)
    np.testing.assert_allclose(mats[0], np.eye(3))


# -- cryoDRGN ----------------------------------------------------------------------------------------
def test_cryodrgn_pickles(conformance_dir):
    rot, origins = read_cryodrgn_poses(conformance_dir / "toy_rot_trans.pkl", box_size=30)
    rot_only, zeros = read_cryodrgn_poses(conformance_dir / "toy_angles.pkl", box_size=30)
    raw_rot, raw_trans = safe_load_pickle(conformance_dir / "toy_rot_trans.pkl")
    assert rot.shape == (1000, 3, 3) and origins.shape == (1000, 2)
    np.testing.assert_allclose(origins, raw_trans * 30)  # fraction of the box -> pixels
    np.testing.assert_array_equal(rot, rot_only)  # both toy pickles hold the same matrices
    assert not zeros.any()
    hand, _ = read_cryodrgn_poses(conformance_dir / "hand_rot.pkl", box_size=64)
    assert hand.shape == (100, 3, 3)
    ctf, box, apix = read_cryodrgn_ctf(conformance_dir / "test_ctf.pkl")
    raw = safe_load_pickle(conformance_dir / "test_ctf.pkl")
    assert box == 30 and ctf.shape == (1000, len(CTF_COLUMNS))
    np.testing.assert_allclose(apix, raw[:, 1])
    np.testing.assert_allclose(ctf[:, :7], raw[:, 2:9], rtol=1e-6)  # dfU dfV dfAng kV Cs w phase
    np.testing.assert_array_equal(ctf[:, 7:], np.tile([0.0, 1.0], (1000, 1)))
    np.testing.assert_allclose(ctf[0], [0, 0, 0, 300, 0.001, 0.1, 90, 0, 1])


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "poses.pkl"
    bad.write_bytes(pickle.dumps((_Payload(str(sentinel)), np.zeros(3))))
    with pytest.raises(pickle.UnpicklingError, match=r"poses\.pkl.*system"):
        read_cryodrgn_poses(bad, box_size=8)
    assert not sentinel.exists()
    classic = tmp_path / "classic.pkl"
    classic.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match=r"classic\.pkl.*builtins\.eval") as err:
        safe_load_pickle(classic)
    assert isinstance(err.value, InputError)  # printed as a message by train.py, no traceback
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        ok = tmp_path / f"ok{protocol}.pkl"
        ok.write_bytes(pickle.dumps((np.eye(3)[None], {"a": [np.float32(2)]}), protocol=protocol))
        arr, dct = safe_load_pickle(ok)
        assert arr.shape == (1, 3, 3) and dct["a"][0] == 2
    not_rot = tmp_path / "scaled.pkl"
    not_rot.write_bytes(pickle.dumps(2 * np.eye(3)[None]))
    with pytest.raises(InputError, match="not a proper rotation"):
        read_cryodrgn_poses(not_rot, box_size=8)


def test_toy_star_angles_vs_cryodrgn_pickle(conformance_dir):
    """How the toy star's Euler angles relate to cryoDRGN's ``toy_angles.pkl``.

    ``toy_projections.star`` has *no* angle columns (only image names, a zero-defocus CTF and
    ``_dummyVariable``), so its poses cannot be compared with the pickle: reading it gives
    ``rotations is None``. The relation is instead checked on the pixels: projecting
    ``toymodel_small_nocenter.mrc`` with ``A = rot`` from the pickle (via
    :func:`read_particles` with ``poses=``) reproduces the stack, while ``A = rot.T`` does not.
    This agrees with ``conventions.py`` (cryoDRGN ``rot`` *is* RELION's ``A``). The pickle's
    translations were not applied to the toy images (see tests/physics/test_projection.py).
    """
    table = read_particles(
        conformance_dir / "toy_projections.star",
        poses=conformance_dir / "toy_rot_trans.pkl",
        pixel_size_angstrom=1.0,
    )
    angles, _ = read_cryodrgn_poses(conformance_dir / "toy_angles.pkl", box_size=30)
    np.testing.assert_array_equal(table.rotations, angles)
    vol, _ = read_volume(conformance_dir / "toymodel_small_nocenter.mrc")
    idx = np.arange(12)
    ref = torch.from_numpy(ImageStack(conformance_dir / "toy_projections.mrcs").read(idx))
    a = torch.from_numpy(table.rotations[idx]).float()

    def corr(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
        y = ref.flatten(1) - ref.flatten(1).mean(1, keepdim=True)
        return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))

    volume = torch.from_numpy(vol)
    assert corr(project_real(volume, a)).min() > 0.999
    assert corr(project_real(volume, a.transpose(1, 2))).mean() < 0.9


# -- stacks and lists as inputs -----------------------------------------------------------------------
def test_stack_inputs_with_pickles(tmp_path, conformance_dir):
    table = read_particles(
        conformance_dir / "toy_projections.mrcs", ctf=conformance_dir / "test_ctf.pkl"
    )
    assert len(table) == 1000 and table.box_size == 30 and table.rotations is None
    np.testing.assert_allclose(table.pixel_size_angstrom, 1.0)  # from the CTF pickle
    assert table.ctf[0, 6] == 90.0
    hand = read_particles(
        conformance_dir / "hand.mrcs",
        poses=conformance_dir / "hand_rot.pkl",
        pixel_size_angstrom=3.0,
    )
    assert hand.rotations.shape == (100, 3, 3) and hand.pixel_size_angstrom[0] == 3.0
    with pytest.raises(
        InputError, match=r"hand_rot\.pkl: 100 poses but .*toy_projections\.mrcs has 1000"
    ):
        read_particles(
            conformance_dir / "toy_projections.mrcs", poses=conformance_dir / "hand_rot.pkl"
        )
    a = _write_mrc(tmp_path / "a.mrcs", np.zeros((2, 8, 8), np.float32), voxel=1.5)
    _write_mrc(tmp_path / "b.mrcs", np.ones((3, 8, 8), np.float32), voxel=1.5)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# stacks\n{a}\n\nb.mrcs\n")
    table = read_particles(listing)
    assert len(table) == 5 and table.image_indices.tolist() == [0, 1, 0, 1, 2]
    assert table.stacks == [str(a), str(tmp_path / "b.mrcs")]
    np.testing.assert_allclose(table.pixel_size_angstrom, 1.5)
    listing.write_text("a.mrcs\nc.mrcs\n")
    with pytest.raises(MissingFileError, match=r"list\.txt, line 2: image stack c\.mrcs"):
        read_particles(listing)


def test_validate_pixels_names_stack(tmp_path):
    images = np.zeros((6, 8, 8), np.float32)
    images[4, 2, 3] = np.nan
    with pytest.warns(RuntimeWarning):
        _write_mrc(tmp_path / "nan.mrcs", images)
    table = read_particles(tmp_path / "nan.mrcs", pixel_size_angstrom=1.0)
    validate_pixels(table.subset(np.array([0, 1, 2, 3, 5])), n_sample=10)
    with pytest.raises(InputError, match=r"nan\.mrcs: image 4 \(0-based"):
        validate_pixels(table, n_sample=6)


def test_inputs_untouched_by_reading(tmp_path, conformance_dir):
    work = tmp_path / "copy"
    shutil.copytree(conformance_dir, work)
    before = _snapshot(work)
    read_particles(work / "relion31.star")
    read_particles(
        work / "toy_projections.star", poses=work / "toy_rot_trans.pkl", pixel_size_angstrom=1.0
    )
    read_cs(work / CS_FILE)
    read_cryodrgn_ctf(work / "test_ctf.pkl")
    validate_pixels(read_particles(work / "hand.mrcs", pixel_size_angstrom=1.0), n_sample=8)
    assert _snapshot(work) == before  # same files, same bytes, same times: nothing added or changed


def test_stack_memory_maps_are_advised_random_access(tmp_path, monkeypatch):
    """Every (re)opened memory map gets MADV_RANDOM (no read-ahead of neighbouring images)."""
    import hetero.data.io.mrc as mrc_module

    calls = []
    real = mrc_module._advise_random
    monkeypatch.setattr(mrc_module, "_advise_random", lambda data: (calls.append(data.shape), real(data)))
    path = mrc_module.write_stack(tmp_path / "s.mrcs", np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8), 1.0)
    stack = mrc_module.ImageStack(path)
    np.testing.assert_array_equal(stack.read([2, 0]), np.arange(3 * 64, dtype=np.float32).reshape(3, 8, 8)[[2, 0]])
    stack.read([1])
    stack.close()
    stack.read([1])
    assert calls == [(3, 8, 8), (3, 8, 8)]


def _relion_project(root: Path, conformance_dir: Path) -> Path:
    """A RELION project: Extract/job133/relion31.mrcs and Refine3D/job012/run_data.star whose
    image names are relative to the project root (as RELION writes them)."""
    stack = root / "Extract" / "job133" / "relion31.mrcs"
    stack.parent.mkdir(parents=True)
    shutil.copy(conformance_dir / "relion31.mrcs", stack)
    star = root / "Refine3D" / "job012" / "run_data.star"
    star.parent.mkdir(parents=True)
    text = (conformance_dir / "relion31.star").read_text()
    star.write_text(text.replace("@relion31.mrcs", "@Extract/job133/relion31.mrcs"))
    return star


def test_subsets_open_where_they_are_written(tmp_path, conformance_dir, monkeypatch, caplog):
    """Issue #18 item 8: names are resolved against the star's folder, the working directory
    and every parent folder (the project root), the log says which matched, and a subset keeps
    RELION's project-relative names inside the project and portable ones elsewhere."""
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "project"
    star = _relion_project(project, conformance_dir)
    caplog.set_level("INFO")
    table = read_particles(star)
    stack = str(project / "Extract" / "job133" / "relion31.mrcs")
    assert set(table.image_paths) == {stack}
    assert f"1 against {project}" in caplog.text
    inside = write_star(project / "hetero" / "run" / "analysis" / "subsets" / "c0.star", table, [0, 2])
    assert read_star(inside).rows["rlnImageName"].tolist() == [
        "000001@Extract/job133/relion31.mrcs", "000003@Extract/job133/relion31.mrcs"]
    (tmp_path / "link").symlink_to(project)  # a project reached through a symlink (HPC /home -> /gpfs)
    linked = write_star(tmp_path / "link" / "hetero" / "run" / "c0.star", table, [0, 2])
    assert read_star(linked).rows["rlnImageName"].tolist()[0] == "000001@Extract/job133/relion31.mrcs"
    elsewhere = write_star(tmp_path / "elsewhere" / "c0.star", table, [0, 2])
    # outside the project: absolute names, which RELION (relative names against the directory
    # it runs in) opens from the project as well as from anywhere else
    assert read_star(elsewhere).rows["rlnImageName"].tolist() == [f"000001@{stack}", f"000003@{stack}"]
    # written while the working directory is the project, a subset outside it still gets
    # absolute names: what resolves only from the writer's working directory is not kept
    monkeypatch.chdir(project)
    from_project = write_star(tmp_path / "scratch" / "c0.star", table, [0, 2])
    assert read_star(from_project).rows["rlnImageName"].tolist() == [f"000001@{stack}", f"000003@{stack}"]
    for cwd in (project, tmp_path / "elsewhere"):  # RELION's rule (the project) and a neutral folder
        monkeypatch.chdir(cwd)
        for out in (inside, elsewhere, from_project):
            back = read_particles(out)  # no datadir
            assert back.image_paths.tolist() == [stack, stack]
            np.testing.assert_array_equal(back.image_indices, [0, 2])


def test_write_star_carries_the_poses_in_use(tmp_path, conformance_dir):
    """Issue #11 item 6: after poses are replaced (pickle, or refined by a model), a subset of a
    RELION 3.1 input carries those poses, as one of a 3.0 input does."""
    star = conformance_dir / "relion31.star"
    table = read_star(star)
    rot = random_rotations(5, generator=torch.Generator().manual_seed(4)).double().numpy()
    trans = np.linspace(-0.1, 0.1, 10).reshape(5, 2)
    pkl = tmp_path / "poses.pkl"
    with open(pkl, "wb") as fh:
        pickle.dump((rot, trans), fh)
    replaced = read_particles(star, poses=pkl)
    np.testing.assert_allclose(replaced.origins_px, trans * 256)
    for name, t in (("replaced", replaced), ("original", table)):
        back = read_particles(write_star(tmp_path / f"{name}.star", t, [3, 0]))
        assert _rotation_error(back.rotations, t.rotations[[3, 0]]) < 1e-9
        np.testing.assert_allclose(back.origins_px, t.origins_px[[3, 0]], atol=1e-9)
    # Unchanged poses keep the input's own text (no round trip through matrices).
    original = read_star(tmp_path / "original.star")
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"):
        assert original.rows[col].tolist() == table.rows[col].iloc[[3, 0]].tolist()
    toy = read_star(conformance_dir / "toy_projections.star", pixel_size_angstrom=1.0)
    toy.rotations, toy.origins_px = rot[[0] * 1000], np.ones((1000, 2))
    back = read_particles(write_star(tmp_path / "toy.star", toy, [7]))
    assert _rotation_error(back.rotations, rot[[0]]) < 1e-9
    np.testing.assert_allclose(back.origins_px, [[1.0, 1.0]])
