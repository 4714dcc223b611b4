"""report.html from fake inputs: every section present, images embedded."""

from __future__ import annotations

import numpy as np

from hetero.analysis import plots as P
from hetero.analysis import report as R


def test_report_sections_and_embedded_images(tmp_path):
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(300, 2))
    labels = rng.integers(0, 4, 300)
    figs = [
        P.scatter_by_cluster(tmp_path / "umap.png", xy, labels, xy[:4], "UMAP"),
        P.hexbin_density(tmp_path / "density.png", xy),
        P.cluster_sizes(tmp_path / "sizes.png", np.bincount(labels)),
        P.map_gallery(tmp_path / "maps.png", rng.random((2, 8, 8, 8)), ["a", "b"]),
        P.fsc_curves(tmp_path / "fsc.png", {"state 0": np.linspace(1, 0, 9)}, 16, 2.0),
        P.fsc_grid(tmp_path / "fsc_grid.png", {
            f"cluster {i}": {"fsc_unmasked": np.linspace(1, 0, 9), "fsc_masked": np.linspace(1, 0.1, 9),
                             "res_0.143_unmasked": 4.6, "res_0.143_masked": 4.2} for i in range(5)}, 16, 2.0),
    ]
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss,val/loss\n0,0,1.0,\n0,1,0.5,\n0,1,,0.6\n")
    figs.append(P.loss_curves(tmp_path / "loss.png", csv))
    assert P.loss_curves(tmp_path / "none.png", tmp_path / "missing.csv") is None
    sections = {
        "Files": [R.file_list(tmp_path, [tmp_path / "maps.png"])],
        "Summary": [R.table([("particles", 300), ("AUC", 0.4123456)], ["", ""])],
        "Training": [R.image(figs[6], "loss")],
        "Latent space": [R.image(figs[0], "UMAP"), R.image(figs[1])],
        "Clusters": [R.image(figs[2], "sizes <4>")],
        "Decoded maps": [R.image(figs[3])],
        "Reconstructed maps": [R.image(figs[5])],
        "Ground truth": [R.image(figs[4]), R.paragraph("ARI 1.0")],
    }
    path = R.write_report(tmp_path / "report.html", "hetero analysis", sections, "run")
    text = path.read_text()
    positions = [text.index(f"<h2>{name}</h2>") for name in R.SECTION_ORDER]
    assert positions == sorted(positions)  # canonical order whatever the dict order
    assert text.count('src="data:image/png;base64,iVBOR') == 7  # PNG magic, base64
    assert "sizes &lt;4&gt;" in text and "0.4123" in text
    assert "<script" not in text and 'href="maps.png"' in text
    # Empty sections are left out.
    assert "Ground truth" not in R.render_report("t", {"Summary": ["x"], "Ground truth": []})
