"""Maps: resampling to the original grid, the .mrc header, the ChimeraX script."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import torch

from hetero.analysis.volumes import (
    contour_level,
    decode_volumes,
    resample_to_box,
    write_chimerax_script,
    write_maps,
)
from tests.analysis.fakes import APIX, BOX, TEMPLATE, VOXEL, FakeModel, blob


def test_decode_resample_write_header(tmp_path):
    model = FakeModel()
    z = np.array([[-4.0, 0.0], [4.0, 0.0], [0.0, 0.0]], np.float32)
    vols = decode_volumes(lambda points: model.decode(torch.as_tensor(points)), z, batch_size=2)
    assert vols.shape == (3, TEMPLATE, TEMPLATE, TEMPLATE)
    maps = resample_to_box(vols, VOXEL, BOX, APIX)
    assert maps.shape == (3, BOX, BOX, BOX)
    # Same physical object on the finer grid (the blob is band-limited at the template Nyquist).
    assert torch.allclose(maps[0], blob(-4.0, BOX, APIX), atol=2e-3)
    paths = write_maps(tmp_path / "maps", maps, APIX, "cluster")
    assert [p.name for p in paths] == ["cluster_000.mrc", "cluster_001.mrc", "cluster_002.mrc"]
    with mrcfile.open(paths[1]) as mrc:
        assert mrc.data.shape == (BOX, BOX, BOX)
        assert mrc.voxel_size.x == pytest.approx(APIX) and mrc.voxel_size.z == pytest.approx(APIX)
        assert (mrc.header.cella.x, mrc.header.cella.z) == pytest.approx((BOX * APIX, BOX * APIX))
        assert tuple(float(v) for v in (mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z)) == (0, 0, 0)
        np.testing.assert_allclose(mrc.data, maps[1].numpy(), atol=1e-6)


def test_resample_rejects_different_extent():
    with pytest.raises(ValueError, match="cannot resample"):
        resample_to_box(torch.zeros(1, 16, 16, 16), 2.0, 32, 1.5)


def test_chimerax_script(tmp_path):
    maps = write_maps(tmp_path, torch.rand(2, 8, 8, 8), 1.0, "pc1")
    level = contour_level(torch.rand(2, 8, 8, 8))
    script = write_chimerax_script(tmp_path / "pc1.cxc", maps, level, play=True).read_text()
    assert "open pc1_000.mrc pc1_001.mrc vseries true" in script
    assert f"level {level:.6g}" in script and "vseries play #1" in script


def test_write_maps_numbers_from_first(tmp_path):
    paths = write_maps(tmp_path, torch.rand(2, 4, 4, 4), 1.0, "class", first=1)
    assert [p.name for p in paths] == ["class_001.mrc", "class_002.mrc"]
