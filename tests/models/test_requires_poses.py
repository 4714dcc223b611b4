"""Issue #11 item 4: every model that renders at the consensus poses refuses data without them,
naming the file, whatever the sampler (the HEALPix sampler's own check is not the only one)."""

from __future__ import annotations

import re

import hydra
import pytest

from hetero.data.io.errors import InputError
from tests.helpers import compose_train
from tests.test_configs import INFO, options


@pytest.mark.parametrize("option", options("model"))
def test_models_refuse_data_without_poses(tmp_path, option):
    cfg = compose_train(tmp_path, [f"model={option}", "data/sampler=random"])
    from omegaconf import OmegaConf

    if any(OmegaConf.is_missing(cfg.model, k) for k in cfg.model):
        pytest.skip(f"model={option} needs a trained run (e.g. model.forward_run); its data are that run's")
    info = {**INFO, "has_poses": False, "particles_file": "/data/no_angles.star"}
    with pytest.raises(Exception) as caught:  # Hydra wraps it (InstantiationException from it)
        hydra.utils.instantiate(cfg.model, **info)
    err = caught.value
    while not isinstance(err, InputError) and err.__cause__ is not None:
        err = err.__cause__
    assert isinstance(err, InputError)
    assert re.search(r"/data/no_angles\.star: no poses .*data\.poses=<cryoDRGN pose pickle>", str(err))
    model = hydra.utils.instantiate(cfg.model, **{**info, "has_poses": True})
    assert model.requires_poses
