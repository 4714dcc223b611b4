"""Analyse a training run: ``python analyze.py run_dir=logs/train/runs/<timestamp>``.

Writes decoded maps (clusters, PC traversals), maps reconstructed from each cluster's
particles with half maps and FSC, RELION/cryoSPARC particle subsets, figures,
``metrics.json`` and a self-contained ``report.html`` to ``<run_dir>/analysis``. All options live
in ``conf/analyze.yaml``; the work is done by :func:`hetero.tasks.analyze.analyze`.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    from hetero.tasks.analyze import analyze

    analyze(cfg)


if __name__ == "__main__":
    main()
