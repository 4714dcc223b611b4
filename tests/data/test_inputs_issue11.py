"""Inputs read right or refused (issue #11): each silent misread now reads right or raises an
InputError naming the file, line/row/field and what to pass; each refusal has a way out."""

from __future__ import annotations

import pickle
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from hetero.data.dataset import ParticleDataset
from hetero.data.io import (
    InputError,
    MissingFileError,
    read_cs,
    read_particles,
    read_star,
    write_star,
)
from hetero.data.particles import ParticleTable
from hetero.data.resample import resample_plan
from hetero.physics.projection import project_real
from hetero.physics.rotations import random_rotations

CS_FILE = "cryosparc_P12_J24_001_particles.cs"


def _mrc(path: Path, data: np.ndarray, voxel: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data, np.float32))
        m.voxel_size = voxel
    return path


RELION30 = """data_images

loop_
_rlnDefocusU
_rlnDefocusV
_rlnDefocusAngle
_rlnImageName
_rlnAngleRot
_rlnAngleTilt
_rlnAnglePsi
_rlnOriginX
_rlnOriginY
_rlnGroupNumber
_rlnVoltage
_rlnSphericalAberration
_rlnDetectorPixelSize
_rlnMagnification
"""


def _row(i: int, dfv: str = "9000", ac: str = "") -> str:
    return f"10000 {dfv} 30 {i}@st.mrcs 10 20 30 1.5 -2 1 300 2.7 {ac}14 50000\n"


# -- 1: a row with a value missing in the middle ---------------------------------------------------
def test_row_with_a_missing_value_names_the_line(tmp_path):
    _mrc(tmp_path / "st.mrcs", np.zeros((3, 8, 8)))
    star = tmp_path / "old.star"
    star.write_text(RELION30 + _row(1) + _row(2).replace("9000 ", ""))
    with pytest.raises(
        InputError,
        match=r"old\.star, line 19 \(data_images row 2\): 13 values but the loop declares 14 "
        r"columns \(rlnDefocusU, .*rlnGroupNumber.*\); .*missing or extra",
    ):
        read_particles(star, amplitude_contrast=0.1)
    star.write_text(RELION30 + _row(1) + _row(2))
    table = read_particles(star, amplitude_contrast=0.1)
    np.testing.assert_allclose(table.ctf[:, :3], [[10000, 9000, 30]] * 2)
    np.testing.assert_allclose(table.origins_px, [[1.5, -2.0]] * 2)


# -- 9: RELION 3.0 without rlnAmplitudeContrast ----------------------------------------------------
def test_missing_amplitude_contrast_has_an_override(tmp_path):
    _mrc(tmp_path / "st.mrcs", np.zeros((3, 8, 8)))
    star = tmp_path / "old.star"
    star.write_text(RELION30 + _row(1) + _row(3))
    with pytest.raises(
        InputError, match=r"old\.star: column rlnAmplitudeContrast is missing .*data\.amplitude_contrast="
    ):
        read_particles(star)
    table = read_particles(star, amplitude_contrast=0.07)
    np.testing.assert_allclose(table.ctf[:, 3:6], [[300.0, 2.7, 0.07]] * 2)
    with_ac = tmp_path / "with.star"
    with_ac.write_text(
        RELION30.replace("_rlnMagnification\n", "_rlnMagnification\n_rlnAmplitudeContrast\n")
        + _row(1).replace("\n", " 0.1\n")
    )
    with pytest.raises(InputError, match=r"data\.amplitude_contrast=0\.07 was given but .*\[0\.1\]"):
        read_particles(with_ac, amplitude_contrast=0.07)
    no_voltage = tmp_path / "nov.star"
    no_voltage.write_text(
        RELION30.replace("_rlnVoltage\n", "") + _row(1).replace(" 300 2.7", " 2.7")
    )
    with pytest.raises(InputError, match=r"rlnVoltage is missing .*data\.voltage_kv=<value in kV>"):
        read_particles(no_voltage, amplitude_contrast=0.1)
    assert read_particles(no_voltage, amplitude_contrast=0.1, voltage_kv=200).ctf[0, 3] == 200.0


# -- 10: no rlnImageSize and no stack: metadata-only reads work ------------------------------------
def test_metadata_reads_without_the_stacks(tmp_path):
    star = tmp_path / "meta.star"
    star.write_text(RELION30 + _row(1) + _row(2))
    table = read_star(star, amplitude_contrast=0.1)  # the stack st.mrcs does not exist
    assert table.box_size is None and len(table) == 2
    out = write_star(tmp_path / "sub" / "one.star", table, [1])
    assert "rlnImageSize" not in out.read_text()
    assert read_star(out).image_indices.tolist() == [1]
    with pytest.raises(
        MissingFileError, match=r"meta\.star: the file has no rlnImageSize.*st\.mrcs.*data\.datadir"
    ):
        read_particles(star, amplitude_contrast=0.1)


# -- 11: RELION 5 tomography ------------------------------------------------------------------------
def test_tomography_star_is_refused_plainly(tmp_path):
    star = tmp_path / "tomo.star"
    star.write_text(
        "data_general\n\n_rlnTomoSubTomosAre2DStacks 1\n\ndata_particles\n\nloop_\n_rlnTomoName\n"
        "_rlnTomoParticleName\n_rlnImageName\nTS_01 TS_01/1 Subtomograms/TS_01/1_stack2d.mrcs\n"
    )
    with pytest.raises(InputError, match=r"tomo\.star: a RELION tomography .*not supported yet"):
        read_particles(star)


# -- 12: cryoSPARC .cs with a large header ----------------------------------------------------------
def test_cs_with_a_100_class_header_is_read(tmp_path):
    _mrc(tmp_path / "J1" / "p.mrcs", np.zeros((2, 8, 8)))
    fields = [("blob/path", "S10"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
              ("blob/psize_A", "<f4"), ("blob/sign", "<f4")]
    fields += [(f"alignments_class_{k}/{f}", "<f4") for k in range(100)
               for f in ("pose", "shift", "class_posterior", "error", "weight")]
    rec = np.zeros(2, dtype=fields)
    rec["blob/path"], rec["blob/idx"], rec["blob/shape"], rec["blob/psize_A"] = b">J1/p.mrcs", [0, 1], 8, 1.5
    rec["blob/sign"] = -1.0
    path = tmp_path / "P1" / "J9_particles.cs"
    path.parent.mkdir()
    with open(path, "wb") as fh:
        np.save(fh, rec)
    with pytest.raises(ValueError, match="header"):
        np.load(path, allow_pickle=False)  # numpy's default limit refuses it
    table = read_cs(path, datadir=tmp_path)
    assert len(table) == 2 and table.image_sign.tolist() == [-1.0, -1.0]


# -- 2: blob/sign ----------------------------------------------------------------------------------
def test_cryosparc_blob_sign_gives_white_density(conformance_dir, tmp_path):
    raw = np.load(conformance_dir / CS_FILE, allow_pickle=False)
    table = read_cs(conformance_dir / CS_FILE)
    np.testing.assert_array_equal(table.image_sign, raw["blob/sign"])
    assert (table.image_sign == -1).all()
    # alignments3D/alpha, cryoSPARC's per-particle scale, multiplies the CTF scale (item 7).
    np.testing.assert_allclose(table.ctf[:, 8], raw["ctf/scale"] * raw["alignments3D/alpha"], rtol=1e-6)
    stack = _mrc(tmp_path / "s.mrcs", np.stack([np.full((8, 8), 2.0), np.full((8, 8), 3.0)]))
    t = ParticleTable(image_paths=[str(stack)] * 2, image_indices=[0, 1], box_size=8,
                      pixel_size_angstrom=1.0, image_sign=np.array([-1.0, 1.0]))
    images = ParticleDataset(t).read_batch([0, 1])["image"]
    assert images[0].mean().item() == -2.0 and images[1].mean().item() == 3.0
    flipped = ParticleDataset(t, invert_contrast=True).read_batch([0, 1])["image"]
    assert flipped[0].mean().item() == 2.0 and flipped[1].mean().item() == -3.0


# -- 7: optics corrections hetero does not model -----------------------------------------------------
def test_unmodelled_optics_are_named_once(tmp_path, caplog, conformance_dir):
    text = (conformance_dir / "relion31.star").read_text()
    head, _, rest = text.partition("_rlnOpticsGroup")
    assert "_rlnBeamTiltX" not in text
    star = tmp_path / "tilt.star"
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("_rlnOpticsGroupName"))
    lines.insert(i + 1, "_rlnBeamTiltX")
    j = next(k for k, line in enumerate(lines) if line.strip().startswith("1 ") or line.strip().startswith("opticsGroup1"))
    lines[j] = lines[j] + " 0.35"
    star.write_text("\n".join(lines) + "\n")
    caplog.set_level("WARNING")
    read_star(star, datadir=conformance_dir)
    warnings = [r for r in caplog.records if "do not model" in r.getMessage() or "does not model" in r.getMessage()]
    assert len(warnings) == 1 and "rlnBeamTiltX" in warnings[0].getMessage()
    caplog.clear()
    read_star(conformance_dir / "relion31.star")
    assert "does not model" not in caplog.text


# -- 5: cryoDRGN pose pickles with shifts in pixels --------------------------------------------------
def test_pixel_shift_pickle_is_refused_and_read_with_the_option(tmp_path):
    stack = _mrc(tmp_path / "s.mrcs", np.zeros((3, 64, 64)))
    rot = random_rotations(3, generator=torch.Generator().manual_seed(0)).double().numpy()
    trans = np.array([[3.0, -2.5], [20.5, 1.0], [0.0, 0.0]])  # pixels
    pkl = tmp_path / "old_poses.pkl"
    with open(pkl, "wb") as fh:
        pickle.dump((rot, trans), fh)
    with pytest.raises(
        InputError,
        match=r"old_poses\.pkl: translation of row 0 .*read as a fraction of the box.*outside the 64-px image.*"
        r"data\.pose_shift_units=pixels",
    ):
        read_particles(stack, poses=pkl, pixel_size_angstrom=1.0)
    table = read_particles(stack, poses=pkl, pixel_size_angstrom=1.0, pose_shift_units="pixels")
    np.testing.assert_allclose(table.origins_px, trans)
    fractions = tmp_path / "poses.pkl"
    with open(fractions, "wb") as fh:
        pickle.dump((rot, trans / 64), fh)
    np.testing.assert_allclose(read_particles(stack, poses=fractions, pixel_size_angstrom=1.0).origins_px, trans)
    with pytest.raises(InputError, match=r"pose_shift_units='px'; expected one of fraction, pixels"):
        read_particles(stack, poses=fractions, pixel_size_angstrom=1.0, pose_shift_units="px")


# -- 3: optics groups with different pixel sizes ----------------------------------------------------
def _blob(box: int, apix: float, rot: np.ndarray) -> np.ndarray:
    """Projections of a 3-D Gaussian (sigma 6 Å at (6, -4, 2) Å) sampled at ``apix``."""
    axis = (np.arange(box) - box // 2) * apix
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    vol = np.exp(-((x - 6) ** 2 + (y + 4) ** 2 + (z - 2) ** 2) / (2 * 6.0**2))
    proj = project_real(torch.from_numpy(vol), torch.from_numpy(rot))
    return (proj * apix).numpy()  # line integrals in Å


def test_optics_groups_with_different_pixel_sizes_are_resampled(tmp_path):
    box, n = 48, 4
    rot = random_rotations(n, generator=torch.Generator().manual_seed(2)).double().numpy()
    groups = {1: 2.0, 2: 2.2}
    for g, apix in groups.items():
        _mrc(tmp_path / f"g{g}.mrcs", _blob(box, apix, rot), voxel=apix)
    optics = "".join(f"{g} opticsGroup{g} {a} {box} 2 300 2.7 0.1\n" for g, a in groups.items())
    rows = "".join(f"{i + 1}@g{g}.mrcs {g}\n" for g in groups for i in range(n))
    star = tmp_path / "two.star"
    star.write_text(
        "data_optics\n\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n_rlnImagePixelSize\n"
        "_rlnImageSize\n_rlnImageDimensionality\n_rlnVoltage\n_rlnSphericalAberration\n"
        "_rlnAmplitudeContrast\n" + optics + "\ndata_particles\n\nloop_\n_rlnImageName\n"
        "_rlnOpticsGroup\n" + rows
    )
    table = read_particles(star)
    table.rotations = np.concatenate([rot, rot])
    ds = ParticleDataset(table, box_size=40)
    batch = ds.read_batch(np.arange(2 * n))
    np.testing.assert_allclose(batch["apix"].numpy(), 2.0 * 48 / 40, rtol=1e-6)
    # Group 2 (2.2 Å/px) resampled to the group-1 grid matches group 1 (same particles).
    first, second = batch["image"][:n], batch["image"][n:]
    rel = ((second - first).norm() / first.norm()).item()
    assert rel < 0.02
    unresampled = torch.from_numpy(ds.read_raw(np.arange(n, 2 * n)))
    from hetero.physics.fourier import fourier_crop_2d

    plain = fourier_crop_2d(unresampled, 40)
    assert ((plain - first).norm() / first.norm()).item() > 0.1  # the scale error it removes
    sizes = np.array([1.0, 1.0, 0.5078])  # 32.5 px of the 64-px grid: rounding costs 0.5 px
    plan = resample_plan(sizes, 64, 64)
    assert plan.sizes.tolist() in ([64, 64, 32], [64, 64, 33]) and plan.edge_error_px > 0.45
    bad = ParticleTable(image_paths=[str(tmp_path / "g1.mrcs")] * 3, image_indices=[0, 1, 2],
                        box_size=64, pixel_size_angstrom=sizes, source="x.star")
    with pytest.raises(InputError, match=r"x\.star: optics groups have pixel sizes .*data\.box_size"):
        ParticleDataset(bad)
