"""How often would OPUS-DSD's ``model.encoder_logstd_max`` act? Trains a configuration and counts,
in every training forward pass, the encoder's raw log-sigma outputs above the bound.

The bound (default 2.0) is a clamp applied after the encoder's log-sigma head, which is where
the hook counts (the run trains with the configuration's own bound); a count of 0 means the run
trained exactly as it would have unbounded. Usage (any ``train.py`` overrides)::

    python benchmarks/bench_logstd_bound.py +experiment=demo
    python benchmarks/bench_logstd_bound.py model=opusdsd_cpu data.particles.n_particles=300 trainer.max_epochs=50

Prints one line per epoch (values above the bound so far, values seen, the largest raw value) and
writes the per-epoch record as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


class LogStdCount(L.Callback):
    """Counts raw encoder log-sigma values above ``bound`` in training forward passes."""

    def __init__(self, bound: float = 2.0) -> None:
        self.bound, self.above, self.seen, self.max, self.epochs = float(bound), 0, 0, -float("inf"), []

    def setup(self, trainer, pl_module, stage) -> None:
        def hook(module, inputs, out):
            if module.training and torch.is_grad_enabled():
                self.above += int((out > self.bound).sum())
                self.seen += out.numel()
                self.max = max(self.max, float(out.max()))

        pl_module.encoder.logstd.register_forward_hook(hook)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        row = {"epoch": trainer.current_epoch, "above": self.above, "seen": self.seen, "max_raw": self.max}
        self.epochs.append(row)
        print(f"epoch {row['epoch']}: {self.above} of {self.seen} above {self.bound:g}, max raw {self.max:.2f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="train.py overrides")
    parser.add_argument("--bound", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the per-epoch counts")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from hetero.tasks.train import train

    with tempfile.TemporaryDirectory(prefix="logstd") as tmp:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*args.overrides, "predict=false"])
        with open_dict(cfg):
            cfg.paths.output_dir = tmp
            cfg.paths.work_dir = str(REPO)
        counter = LogStdCount(args.bound)
        import hetero.tasks.train as task

        task_callbacks = task._callbacks
        task._callbacks = lambda c: [*task_callbacks(c), counter]
        train(cfg)
    record = {"overrides": args.overrides, "bound": args.bound, "epochs": counter.epochs}
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
