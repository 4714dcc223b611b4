"""The console summary leads with the method's own assignment when the method has one."""

from __future__ import annotations

from pathlib import Path

from hetero.analysis.steps.report import print_summary


def test_summary_leads_with_the_methods_own_assignment(capsys):
    metrics = {
        "n_particles": 100,
        "ground_truth": {"ari": 0.98, "method_ari": 0.756, "oracle_ari": 0.99},
    }
    print_summary(metrics, Path("report.html"))
    out = capsys.readouterr().out
    own = out.index("ARI, the method's own assignment")
    kmeans = out.index("ARI, k-means on the embedding")
    assert own < kmeans
    own_line = next(line for line in out.splitlines() if "own assignment" in line)
    assert "0.756" in own_line


def test_summary_without_method_labels_shows_kmeans_only(capsys):
    print_summary({"n_particles": 10, "ground_truth": {"ari": 0.5}}, Path("r.html"))
    out = capsys.readouterr().out
    assert "k-means on the embedding" in out and "own assignment" not in out
