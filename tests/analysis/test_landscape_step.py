"""The shared ``landscape`` analysis step on a run's embedding (AlphaCryo4D's stages 5-7 for any
model): the path joins two of the planted particle clusters and the maps decoded along it
move in order between them."""

from __future__ import annotations

import json

import mrcfile
import numpy as np

from hetero.tasks.analyze import analyze
from tests.analysis.fakes import STATES, make_run_dir
from tests.analysis.test_analyze_task import compose_analyze


def test_landscape_step_path_between_planted_clusters(tmp_path):
    run, truth = make_run_dir(tmp_path)  # 2-D z: clusters at x = -6, 0, 6 (sigma 0.3)
    cfg = compose_analyze([f"run_dir={run}", "steps=[embedding,landscape]", "landscape.enabled=true",
                           "landscape.k=4", "umap.enabled=false", "pca_components=2"])
    metrics = analyze(cfg)
    out = run / "analysis"
    path = np.load(out / "landscape" / "path.npy")
    ends = sorted(path[[0, -1], 0])
    # both ends in a planted cluster (G minima), two different ones, on the y = 0 line
    for x in ends:
        assert np.min(np.abs(STATES - x)) < 1.0
    assert abs(ends[1] - ends[0]) > 4.0 and np.abs(path[:, 1]).max() < 1.5
    assert metrics["landscape"]["n_states"] == 4
    maps = sorted((out / "maps" / "decoded" / "path").glob("path_*.mrc"))
    assert len(maps) == 4 and (out / "maps" / "decoded" / "path" / "path.cxc").is_file()
    # the fake decoder puts a blob at x = z_0: its centre of mass moves monotonically
    com = []
    for m in maps:
        with mrcfile.open(m) as f:
            v = np.asarray(f.data, np.float64)
        com.append((v.sum((0, 1)) * np.arange(v.shape[-1])).sum() / v.sum())
    steps = np.diff(com)
    assert (steps > 0).all() or (steps < 0).all()
    assert json.loads((out / "metrics.json").read_text())["landscape"]["n_minima"] >= 2
