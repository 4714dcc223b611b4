"""DynaMight-specific analysis functions: marker/PDB files read back, the ChimeraX frame against a
written map, displacements along PCs and between centres for a known linear deformation,
deformation magnitude, half-set disagreement, value maps and series scripts."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import mrcfile
import numpy as np
import pytest
import torch

from hetero.models.dynamight import analysis as A
from hetero.physics.gaussians import rasterize_gaussians


def test_markers_round_trip(tmp_path):
    pos = np.array([[1.0, 2.0, 3.0], [-4.5, 0.25, 10.0]])
    colors = A.value_colors(np.array([0.0, 1.0]))
    path = A.write_markers(tmp_path / "m.cmm", pos, radius=np.array([1.5, 2.5]), colors=colors, name="half 1")
    root = ET.parse(path).getroot()
    assert root.tag == "marker_set" and root.get("name") == "half 1"
    markers = root.findall("marker")
    assert len(markers) == 2
    got = np.array([[float(m.get(k)) for k in "xyz"] for m in markers])
    np.testing.assert_allclose(got, pos, atol=1e-3)
    assert [float(m.get("radius")) for m in markers] == [1.5, 2.5]
    np.testing.assert_allclose([float(markers[1].get(c)) for c in "rgb"], colors[1], atol=1e-3)


def test_pdb_columns_and_chains(tmp_path):
    n = 10005
    pos = np.random.default_rng(0).normal(size=(n, 3)) * 30
    b = np.linspace(0, 20, n)
    lines = A.write_pdb(tmp_path / "g.pdb", pos, bfactors=b).read_text().splitlines()
    atoms = [ln for ln in lines if ln.startswith("HETATM")]
    assert len(atoms) == n and lines[-1] == "END"
    for i in (0, 9998, 9999, n - 1):
        ln = atoms[i]
        xyz = [float(ln[30:38]), float(ln[38:46]), float(ln[46:54])]
        np.testing.assert_allclose(xyz, pos[i], atol=1e-3)
        assert float(ln[60:66]) == pytest.approx(b[i], abs=0.01)
        assert ln[17:20] == "GAU" and ln[76:78].strip() == "C"
    assert atoms[9998][21] == "A" and atoms[9999][21] == "B" and int(atoms[9999][22:26]) == 1


def test_chimerax_frame_matches_a_written_map(tmp_path):
    """A Gaussian at position r (Å from the box centre) peaks in the written map at the voxel
    whose ChimeraX coordinate is chimerax_coordinates(r)."""
    from hetero.data.io.mrc import write_volume

    box, apix = 32, 2.5
    r = np.array([[6.0, -8.5, 12.0]])
    vol = rasterize_gaussians(torch.tensor(r, dtype=torch.float32), 3.0, torch.ones(1), box, apix)
    write_volume(tmp_path / "v.mrc", vol.numpy(), apix)
    with mrcfile.open(tmp_path / "v.mrc") as m:
        data, origin = np.asarray(m.data), float(m.header.origin.x)
    z, y, x = np.unravel_index(np.argmax(data), data.shape)
    peak = origin + np.array([x, y, z]) * apix
    np.testing.assert_allclose(peak, A.chimerax_coordinates(r, box, apix)[0], atol=apix / 2 + 1e-6)


def _linear_deform(consensus, weights):
    def deform(z):
        return consensus[None] + (z @ weights).reshape(len(z), *consensus.shape)
    return deform


def test_displacements_of_a_linear_deformation():
    rng = np.random.default_rng(1)
    n, zdim = 7, 3
    consensus = rng.normal(size=(n, 3))
    w = rng.normal(size=(zdim, n * 3))
    deform = _linear_deform(consensus, w)
    comps = np.linalg.qr(rng.normal(size=(zdim, zdim)))[0][:2]
    scales = np.array([2.0, 0.5])
    mean = rng.normal(size=zdim)
    d = A.pc_displacements(deform, mean, comps, scales, n_sigma=2.0)
    expected = np.stack([(4.0 * s * c) @ w for s, c in zip(scales, comps)]).reshape(2, n, 3)
    np.testing.assert_allclose(d, expected, rtol=1e-4, atol=1e-5)

    centres = rng.normal(size=(3, zdim)).astype(np.float32)
    out = A.centre_displacements(deform, centres, consensus)
    np.testing.assert_allclose(out["from_consensus"], (centres @ w).reshape(3, n, 3), rtol=1e-4, atol=1e-5)
    assert out["rmsd"].shape == (3, 3) and np.allclose(np.diag(out["rmsd"]), 0)
    diff = ((centres[0] - centres[2]) @ w).reshape(n, 3)
    assert out["rmsd"][0, 2] == pytest.approx(np.sqrt((diff**2).sum(-1).mean()), rel=1e-4)


def test_deformation_summary_and_disagreement():
    s = A.deformation_summary(np.array([1.0, 2.0, 3.0, 10.0]), np.array([2.0, 5.0, 4.0, 30.0]))
    assert s["mean_rmsd"] == 4.0 and s["max_rmsd"] == 10.0 and s["max_displacement"] == 30.0
    rng = np.random.default_rng(2)
    a = rng.normal(size=(50, 6, 3))
    same = A.half_set_disagreement(a, a)
    assert np.all(same["rms_difference"] == 0)
    shifted = a.copy()
    shifted[:, 2] += np.array([3.0, 4.0, 0.0])  # Gaussian 2 disagrees by exactly 5 Å
    out = A.half_set_disagreement(a, shifted)
    assert out["rms_difference"][2] == pytest.approx(5.0)
    assert np.all(out["rms_difference"][[0, 1, 3, 4, 5]] == 0)
    with pytest.raises(ValueError):
        A.half_set_disagreement(a, a[:, :3])


def test_value_map_carries_each_gaussians_value(tmp_path):
    pos = np.array([[-15.0, 0.0, 0.0], [15.0, 0.0, 0.0]])
    vmap = A.value_map(pos, np.array([2.0, 7.0]), sigma=3.0, box_size=32, apix=2.0)
    c = 16
    assert vmap[c, c, c - 7] == pytest.approx(2.0, rel=1e-3)  # x = -14 Å
    assert vmap[c, c, c + 7] == pytest.approx(7.0, rel=1e-3)
    assert vmap[0, 0, 0] == 0.0
    path = A.write_value_map(tmp_path / "val.mrc", pos, np.array([2.0, 7.0]), 3.0, 32, 2.0)
    script = A.write_color_by_map_script(tmp_path / "color.cxc", tmp_path / "cons.mrc", path, 0.1, 2, 7,
                                         markers=tmp_path / "m.cmm")
    text = script.read_text()
    assert "open cons.mrc" in text and "open val.mrc" in text and "open m.cmm" in text
    assert "color sample #1 map #2 palette bluered range 2,7" in text


def test_series_scripts(tmp_path):
    frames = np.random.default_rng(3).normal(size=(4, 5, 3))
    paths = A.write_marker_series(tmp_path / "pc1", frames, "pc1", movie="pc1.mp4")
    assert [p.name for p in paths] == ["pc1_000.cmm", "pc1_001.cmm", "pc1_002.cmm", "pc1_003.cmm", "pc1.cxc"]
    text = paths[-1].read_text()
    assert "open pc1_000.cmm pc1_001.cmm pc1_002.cmm pc1_003.cmm" in text
    assert "mseries #1-4" in text and "movie encode pc1.mp4" in text
    maps = [tmp_path / f"m_{i}.mrc" for i in range(3)]
    movie = A.write_map_movie_script(tmp_path / "movie.cxc", maps, 0.5, "pc1_maps.mp4").read_text()
    assert "open m_0.mrc m_1.mrc m_2.mrc vseries true" in movie and "movie encode pc1_maps.mp4" in movie


def test_disagreement_figure(tmp_path):
    rng = np.random.default_rng(4)
    path = A.disagreement_figure(tmp_path / "fig.png", rng.normal(size=(30, 3)), rng.random(30), rng.random(30))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
