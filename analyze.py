"""Analyse a training run: ``python analyze.py run_dir=logs/train/runs/<timestamp>``.

Writes decoded maps (clusters, PC traversals), maps reconstructed from each cluster's
particles with half maps and FSC, RELION/cryoSPARC particle subsets, figures,
``metrics.json`` and a self-contained ``report.html`` to ``<run_dir>/analysis``. All options live
in ``conf/analyze.yaml``; the work is done by :func:`hetero.tasks.analyze.analyze`. Input
errors print as a message alone (exit status 1); bugs keep their traceback.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    from hetero.tasks.analyze import analyze
    from hetero.tasks.cli import run_task

    run_task(analyze, cfg)


if __name__ == "__main__":
    main()
