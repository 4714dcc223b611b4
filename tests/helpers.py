"""Config composition helpers for task-level tests (LHT style: compose + open_dict)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# A tiny synthetic dataset shared by task tests (generated once per test session).
TINY_PARTICLES = [
    "data.particles.n_particles=400",
    "data.particles.box_size=32",
    "data.particles.pixel_size_angstrom=5.0",
    "data.particles.n_states=2",
    "data.particles.snr=1.0",
]
TINY_DATA = [
    "data.box_size=24",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "data.norm_sample_size=100",
    "data.val_fraction=0.1",
]

# Narrow OPUS-DSD networks so a CPU step takes well under a second at box 24.
TINY_OPUSDSD = [
    "model=opusdsd",
    "model.template_size=16",
    "model.encoder_channels=[4,8,8]",
    "model.decoder_channels=[16,8,8,4]",
    "model.fc_width=32",
    "model.decoder_fc_width=32",
]


def compose_train(
    output_dir: Path, overrides: list[str] | None = None, tiny_synthetic: bool = True
) -> DictConfig:
    """The training config with CPU/quiet defaults and ``paths.output_dir`` set.

    ``tiny_synthetic`` shrinks the built-in synthetic dataset (only valid with ``data=synthetic``).
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            return_hydra_config=False,
            overrides=[
                "trainer=cpu",
                "trainer.max_epochs=1",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                "++callbacks.progress_bar=null",
                "extras.print_config=false",
                "predict=false",
                *(TINY_PARTICLES if tiny_synthetic else []),
                *TINY_DATA,
                *(overrides or []),
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.work_dir = str(Path.cwd())
    return cfg



class BankDump(L.Callback):
    """Writes each rank's OPUS-DSD memory bank to ``<folder>/bank_rank<r>.npz`` at the end of
    training (module level so that ``ddp_spawn`` can pickle it)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            self.folder / f"bank_rank{trainer.global_rank}.npz",
            codes=pl_module.bank.codes.cpu().numpy(),
            seen=pl_module.bank.seen.cpu().numpy(),
            images_seen=int(pl_module.images_seen),
        )


class ParameterDump(L.Callback):
    """Writes each rank's ``state_dict`` (parameters and buffers) to
    ``<folder>/params_rank<r>.pt`` at the end of training (module level so that ``ddp_spawn``
    can pickle it). Pair with :func:`assert_ranks_agree`."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"params_rank{trainer.global_rank}.pt")


def ddp_dump_overrides(folder: Path) -> list[str]:
    """Config overrides that add :class:`ParameterDump` writing into ``folder``."""
    return [
        "++callbacks.param_dump._target_=tests.helpers.ParameterDump",
        f"++callbacks.param_dump.folder={folder}",
    ]


def assert_ranks_agree(folder: Path, world_size: int = 2, rtol: float = 1e-6, atol: float = 1e-8) -> dict:
    """Every rank's dumped ``state_dict`` equals rank 0's, key by key (floating tensors to
    ``rtol``/``atol``, others exactly); returns rank 0's state. The failure names the key and
    the relative difference, so a model whose ranks drift apart under DDP fails here."""
    import torch

    states = [torch.load(Path(folder) / f"params_rank{r}.pt", weights_only=True) for r in range(world_size)]
    ref = states[0]
    assert ref, f"{folder}: empty state_dict"
    for rank, state in enumerate(states[1:], start=1):
        assert state.keys() == ref.keys(), f"rank {rank} has other keys"
        for key, value in ref.items():
            other = state[key]
            if value.is_floating_point() or value.is_complex():
                diff = float((other - value).abs().max()) if value.numel() else 0.0
                scale = float(value.abs().max()) if value.numel() else 0.0
                assert diff <= atol + rtol * scale, (
                    f"{key}: rank {rank} differs from rank 0 by {diff:.3g} (max |value| {scale:.3g})"
                )
            else:
                assert torch.equal(other, value), f"{key}: rank {rank} differs from rank 0"
    return ref


@pytest.fixture(autouse=True)
def one_torch_thread_autouse():
    """One torch thread for the tests of a module that assigns this fixture to a name: runs of
    many small matrix products, where on a loaded 2-core machine two threads spin-wait on each
    other (DynaMight's CI recovery variant at load ~10: 762 s with two threads, 86 s with one);
    an idle machine loses at most a factor 2."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FakeAnalysisContext:
    """The parts of :class:`hetero.analysis.context.AnalysisContext` a method step uses, from
    keyword attributes (``out``, ``sections``, ``cfg``, ``dm``, ...), for testing steps alone."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)

    def section(self, name):
        return self.sections.setdefault(name, [])

    @property
    def fig_dir(self):
        return self.out / "figures"

    def datamodule(self, purpose):
        return self.dm
