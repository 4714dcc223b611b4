"""Every YAML in every config group composes, and the instantiable ones instantiate."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from hetero.data.io.errors import MissingFileError
from tests.helpers import CONF_DIR, compose_train

CONF = Path(CONF_DIR)
INFO = dict(
    n_particles=100, n_train=90, n_val=10, original_box=32, original_apix=5.0,
    box_size=24, apix=6.6667, has_poses=True, has_ctf=True,
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("option", options("data"))
def test_data_configs_instantiate(tmp_path, option):
    """Each data config builds a data module whose input resolves as documented: a published
    entry not downloaded names its URL and the expected path; a custom path that does not
    exist names itself; the synthetic set is described by its own parameters."""
    overrides = [f"data={option}", "++data.root=/no/data"]
    if option == "custom":
        overrides.append("data.particles=/nonexistent/particles.star")
    if option == "synthetic":
        overrides = [f"data={option}"]
    cfg = compose_train(tmp_path, overrides, tiny_synthetic=option == "synthetic")
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.invert_contrast == "auto" and dm.pose_shift_units == "fraction"
    assert dm.box_size == cfg.data.box_size and dm.sampler == cfg.data.sampler
    if option == "synthetic":
        assert dm.particles.params["n_particles"] == 400 and dm.particles.kind == "discrete"
        return
    with pytest.raises(MissingFileError) as err:
        dm.setup("fit")
    if option == "custom":
        assert "/nonexistent/particles.star" in str(err.value)
    else:
        entry = option.replace("empiar", "EMPIAR-")
        assert entry in str(err.value) and f"/no/data/{option}/" in str(err.value)


@pytest.mark.parametrize("option", options("data/sampler"))
def test_sampler_configs(tmp_path, option):
    cfg = compose_train(tmp_path, [f"data/sampler={option}"])
    assert cfg.data.sampler == option


@pytest.mark.parametrize("option", options("model"))
def test_model_configs_instantiate(tmp_path, option):
    """Each model config builds at the data's geometry and renders a batch at that box; the
    latent size is the config's."""
    cfg = compose_train(tmp_path, [f"model={option}"])
    from omegaconf import OmegaConf

    required = [k for k in cfg.model if OmegaConf.is_missing(cfg.model, k)]
    if required:  # e.g. dynamight_inverse's model.forward_run: built in its own tests
        pytest.skip(f"model={option} needs {required} (a trained run); tested in its own module")
    model = hydra.utils.instantiate(cfg.model, **INFO)
    if cfg.task != "hetero.tasks.train.train":
        # a method run as its own task (AlphaCryo4D's stages): its task resolves and its
        # network builds; it renders no particle images
        assert callable(hydra.utils.get_method(cfg.task))
        assert sum(p.numel() for p in model.parameters()) > 0 and model.latent_dim == 0
        return
    assert model.box_size == INFO["box_size"] and model.apix == pytest.approx(INFO["apix"])
    assert model.latent_dim == cfg.model.get("zdim", 0)
    # class3d projects with its own half-plane slices and has no render_method option
    assert model.renderer.method == cfg.model.get("render_method", "fourier")
    import torch

    t = model.template_size
    batch = {"ctf": torch.tensor([[15000.0, 14000.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0]] * 2),
             "apix": torch.full((2,), INFO["apix"])}
    images = model.render(torch.zeros(t, t, t), torch.eye(3).expand(2, 3, 3), batch)
    assert images.shape == (2, INFO["box_size"], INFO["box_size"]) and images.abs().max() == 0


@pytest.mark.parametrize("group", ["loss", "schedule"])
def test_loss_and_schedule_options_instantiate(tmp_path, group):
    """Schedules take their configured values at the ends of a ramp; every loss term carries
    its configured weight."""
    for option in options(group):
        cfg = compose_train(tmp_path, [f"{group}={option}"])
        obj = hydra.utils.instantiate(cfg[group])
        if group == "schedule":
            node = cfg[group]
            if "ramp" in node:
                assert obj(0) == pytest.approx(node.start)
                assert obj(node.ramp) == pytest.approx(node.end)
                assert obj(node.period) == pytest.approx(node.start)  # the cycle restarts
            elif "value" in node:
                assert obj(0) == obj(10**6) == pytest.approx(node.value)
            else:  # an epoch schedule (model=dynamight): phase of an epoch
                assert obj.phase(0) in ("warmup", "main")
        else:
            for name, term in obj.items():
                node = cfg[group][name]
                if term is not None and OmegaConf.is_dict(node) and "weight" in node:
                    assert term.weight == pytest.approx(cfg[group][name].weight)


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_configs_instantiate(tmp_path, option):
    cfg = compose_train(tmp_path, [f"trainer={option}"])
    if cfg.trainer.accelerator == "gpu":
        # Instantiating a GPU trainer needs a GPU; composing must still work.
        assert cfg.trainer.devices >= 1
        return
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert trainer.world_size == cfg.trainer.devices  # ddp_sim: two CPU processes
    assert type(trainer.accelerator).__name__ == "CPUAccelerator"


@pytest.mark.parametrize("group", ["optim", "callbacks", "logger", "debug", "experiment"])
def test_other_groups_compose(tmp_path, group, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for option in options(group):
        prefix = "+" if group == "experiment" else ""
        own_data = option == "cpu_custom"  # a recipe for the user's own particles
        extra = ["data.particles=/data/run_data.star"] if own_data else []
        cfg = compose_train(tmp_path, [f"{prefix}{group}={option}", *extra], tiny_synthetic=not own_data)
        OmegaConf.to_container(cfg, resolve=True)
        if group == "optim":
            import torch

            opt = hydra.utils.instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(1))])
            hydra.utils.instantiate(cfg.optim.scheduler)(opt)
        if group in ("callbacks", "logger") and cfg.get(group):
            for node in cfg[group].values():
                if node is not None:
                    hydra.utils.instantiate(node)


@pytest.mark.parametrize("option", options("launcher") + options("hparams_search"))
def test_launcher_and_sweep_configs_compose(tmp_path, option):
    group = "launcher" if (CONF / "launcher" / f"{option}.yaml").exists() else "hparams_search"
    plugin = "hydra_submitit_launcher" if group == "launcher" else "hydra_optuna_sweeper"
    pytest.importorskip(f"hydra_plugins.{plugin}", reason=f"needs the {plugin} extra (.[slurm] / .[optuna])")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+{group}={option}"], return_hydra_config=True)
    if group == "launcher":
        assert cfg.hydra.launcher.tasks_per_node == cfg.trainer.devices
    else:
        assert cfg.hydra.sweeper.direction == "minimize"


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _settings(cfg) -> tuple:
    return (cfg.optim.optimizer.lr, cfg.optim.scheduler.gamma, cfg.data.batch_size,
            cfg.loss.tv.normalization, cfg.loss.l1.normalization)


def test_opusdsd_defaults_are_each_networks_measured_settings_and_the_paper_one_override_away():
    """docs/benchmarks.md, "OPUS-DSD defaults": each network defaults to what was measured on
    it (the narrow CPU network: lr 1e-3; the reference widths: lr 1e-4, where 1e-3 and 3e-4
    diverged); +experiment=opusdsd_paper gives the paper's; a user's choice still wins."""
    narrow, wide = (1e-3, 1.0, 16, "mean", "mean"), (1e-4, 1.0, 16, "mean", "mean")
    for overrides in (["model=opusdsd_cpu"], ["+experiment=demo"],
                      ["+experiment=cpu_custom", "data.particles=/x.star"]):
        assert _settings(_compose(overrides)) == narrow, overrides
    assert _settings(_compose(["model=opusdsd"])) == wide
    for model in ("opusdsd", "opusdsd_cpu"):
        paper = _compose(["+experiment=opusdsd_paper", f"model={model}"])
        assert _settings(paper) == (1e-4, 0.95, 32, "paper", "paper"), model
    assert _compose(["+experiment=opusdsd_paper"]).model._target_.endswith("OpusDSD")
    assert list(_compose(["+experiment=opusdsd_paper"]).model.encoder_channels)[-1] == 1024
    assert _compose(["model=opusdsd_cpu", "optim.optimizer.lr=5e-4"]).optim.optimizer.lr == 5e-4
    for model in ("opusdsd", "opusdsd_cpu"):
        assert _compose([f"model={model}", "optim=adamw"]).optim.optimizer._target_ == "torch.optim.AdamW"
    homogeneous = _compose([])
    assert (homogeneous.optim.optimizer.lr, homogeneous.optim.scheduler.gamma) == (1e-4, 0.95)


def test_opusdsd_default_learning_rates_are_the_ones_the_recorded_runs_support():
    """The recorded measurements (docs/bench_defaults_*.json) back each default: at the
    reference widths the default lr trained without diverging where every larger one tried
    diverged; on the narrow network the default beat the paper's settings."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    wide = json.loads((docs / "bench_defaults_wide.json").read_text())
    assert wide["model"] == "opusdsd"
    lrs = {float(r["setting"].removeprefix("measured-lr")): r for r in wide["results"]}
    default = _compose(["model=opusdsd"]).optim.optimizer.lr
    assert not lrs[default]["diverged"] and lrs[default]["val_loss"] is not None
    assert [lr for lr in lrs if lr > default] and all(lrs[lr]["diverged"] for lr in lrs if lr > default)
    reduced = json.loads((docs / "bench_defaults_reduced.json").read_text())
    measured_lr = next(float(o.split("=")[1]) for o in reduced["settings"]["measured"] if o.startswith("optim.optimizer.lr="))
    assert _compose(["model=opusdsd_cpu"]).optim.optimizer.lr == measured_lr
    narrow = {r["setting"]: r for r in reduced["results"]}
    assert all("model=opusdsd_cpu" in r["command"] for r in narrow.values())
    assert narrow["measured"]["ari"] > narrow["paper"]["ari"] + 0.2


def test_cpu_recipe_for_ones_own_star_file():
    cfg = _compose(["+experiment=cpu_custom", "data.particles=/data/run_data.star"])
    assert cfg.data.particles == "/data/run_data.star" and cfg.trainer.accelerator == "cpu"
    assert list(cfg.model.encoder_channels) == [8, 16, 32] and cfg.data.box_size == 64
    assert cfg.data.num_workers == 0


def test_default_callbacks_guard_training_and_checkpoints(tmp_path):
    from hetero.callbacks.checkpoint import BestCheckpoint, LastCheckpoint
    from hetero.callbacks.nonfinite import NonFiniteGuard
    from hetero.callbacks.random_state import RandomStateCheckpoint

    cfg = compose_train(tmp_path)
    made = {type(hydra.utils.instantiate(node)) for node in cfg.callbacks.values() if node is not None}
    assert {BestCheckpoint, LastCheckpoint, NonFiniteGuard, RandomStateCheckpoint} <= made
    assert cfg.callbacks.model_checkpoint.save_last is False  # last.ckpt is LastCheckpoint's
    assert cfg.callbacks.last_checkpoint.dirpath == cfg.callbacks.model_checkpoint.dirpath
