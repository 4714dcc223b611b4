"""Train a heterogeneity model: ``python train.py model=opusdsd data=empiar10180 trainer.devices=4``.

All options live in ``conf/`` (see ``python train.py --help``); the work is done by
:func:`hetero.tasks.train.run`.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hetero.tasks.train import run

    return run(cfg)


if __name__ == "__main__":
    main()
