"""Train a heterogeneity model: ``python train.py model=opusdsd data=empiar10180 trainer.devices=4``.

All options live in ``conf/`` (see ``python train.py --help``); the work is done by
:func:`hetero.tasks.train.run`. Resume a run with ``python train.py hydra.run.dir=<run dir>
ckpt_path=last`` (its own config is restored; see :mod:`hetero.tasks.resume`).
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hetero.tasks.cli import run_task
    from hetero.tasks.train import run

    return run_task(run, cfg, output_dir=cfg.paths.output_dir)


if __name__ == "__main__":
    from hetero.tasks.resume import main_with_resume

    main_with_resume(main, CONF)
