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


def _group(masked, unmasked=12.0, randomised_from=20.0):
    return {
        "res_0.143_unmasked": unmasked,
        "res_0.143_masked": masked,
        "randomise_from_angstrom": randomised_from if masked else None,
    }


def test_summary_says_the_masked_resolution_is_the_corrected_one(capsys):
    """Console and report label the masked FSC = 0.143 alike: corrected by phase randomisation."""
    metrics = {"n_particles": 10, "reconstructed": {"clusters": [_group(9.0), _group(10.0)]}}
    print_summary(metrics, Path("r.html"))
    line = next(line for line in capsys.readouterr().out.splitlines() if "clusters FSC" in line)
    assert "masked, corrected" in line and "9-10" in line


def test_summary_never_labels_unmasked_resolutions_masked(capsys):
    """A group without a mask (empty map) makes the row the unmasked resolutions of all groups,
    not a mix of masked and unmasked values under 'masked'."""
    metrics = {
        "n_particles": 10,
        "reconstructed": {"clusters": [_group(9.0), _group(None, unmasked=30.0)]},
    }
    print_summary(metrics, Path("r.html"))
    line = next(line for line in capsys.readouterr().out.splitlines() if "clusters FSC" in line)
    assert "unmasked" in line and "12-30" in line


def test_summary_masked_but_uncorrected_is_not_called_corrected(capsys):
    """Unmasked FSC never below 0.8: no phase randomisation, so no 'corrected' in the label."""
    metrics = {
        "n_particles": 10,
        "reconstructed": {"consensus": [_group(5.0, 5.0, randomised_from=None)]},
    }
    print_summary(metrics, Path("r.html"))
    line = next(line for line in capsys.readouterr().out.splitlines() if "consensus FSC" in line)
    assert "corrected" not in line and "masked" in line


def test_summary_says_when_kmeans_kept_fewer_clusters_than_requested(capsys):
    metrics = {"n_particles": 10, "clusters": {"k": 2, "k_requested": 20, "counts": [5, 5]}}
    print_summary(metrics, Path("r.html"))
    line = next(line for line in capsys.readouterr().out.splitlines() if "clusters" in line)
    assert "2 of 20 requested" in line
