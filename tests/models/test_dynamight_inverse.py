"""``model=dynamight_inverse``: the learned inverse of a trained toy forward run agrees with the
exact iterative inverse (hetero.models.dynamight.inverse_module)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hetero.tasks.train import train
from tests.helpers import compose_train, one_torch_thread_autouse  # noqa: F401 (autouse fixture)
from tests.models.test_dynamight_train import TINY_DYNAMIGHT

#: the toy forward field is amplified to this factor of what 2 epochs learnt, so that the
#: inverse has something to learn (displacements of ~2-4 Å)
AMPLIFY = 6.0


@pytest.fixture(scope="module")
def forward_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("forward")
    train(compose_train(run, [*TINY_DYNAMIGHT, "trainer.max_epochs=2", "predict=false"]))
    manifest = json.loads((run / "manifest.json").read_text())
    ckpt = run / manifest["parts"]["model"]["path"]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    for h in (0, 1):
        state["state_dict"][f"halves.{h}.decoder.out.weight"] *= AMPLIFY
    torch.save(state, ckpt)
    return run


def test_learned_and_iterative_inverses_agree(forward_run, tmp_path):
    cfg = compose_train(tmp_path, ["model=dynamight_inverse", f"model.forward_run={forward_run}",
                                   *(o for o in TINY_DYNAMIGHT if o.startswith("data.")),
                                   "trainer.max_epochs=15", "model.lr=2e-3", "predict=true"])
    _, objects = train(cfg)
    model = objects["model"].eval()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["method"] == "dynamight_inverse"
    assert manifest["parts"]["forward_run"]["path"] == str(forward_run.resolve())
    assert len(model.epoch_losses) == 15 and model.epoch_losses[-1] < model.epoch_losses[0]
    # the learning-rate halving's history travels with the checkpoint (a resume sees the same rule)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    losses = list(model.epoch_losses)
    model.epoch_losses = []
    model.on_load_checkpoint(last)
    assert model.epoch_losses == pytest.approx(losses)
    z = torch.as_tensor(np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32))
    for h in (0, 1):
        vae = model.halves[h]
        rest = vae.consensus.positions_angstrom().detach().expand(16, -1, -1)
        moved = float(model.displacement_field(z, rest[0], h).norm(dim=-1).mean())
        err = {k: float(v) for k, v in model.consistency(z, h).items()}
        print(h, moved, err)
        assert moved > 1.0, moved                               # a field worth inverting (Å)
        assert err["grid_iterative"] < 1e-3 and err["consensus_iterative"] < 1e-3, err
        # the learned inverse agrees with the exact one far better than no inverse at all would
        assert err["learned_vs_iterative"] < 0.25 * moved, (moved, err)
        assert err["consensus_learned"] < 0.25 * moved, (moved, err)
    model.inverse_kind = "iterative"
    y = rest + model.displacement_field(z, rest[0], 1)
    torch.testing.assert_close(model.inverse(z, y, 1), rest, atol=1e-3, rtol=0)
    # analysis of the inverse run: its learned inverse's consistency next to the iterative one's
    from tests.models.test_dynamight_backprojection_trained import analyze_backprojection

    metrics = analyze_backprojection(tmp_path, ["backprojection.regions=2", "backprojection.pad_factor=1"])
    ic = metrics["inverse_consistency"]["half2"]
    assert ic["grid_max"] < 1e-3 and ic["learned"]["learned_vs_iterative"] < 0.5 * ic["deformation_rms"]
    assert (tmp_path / "analysis" / "dynamight" / "backprojection" / "map_half1.mrc").is_file()
