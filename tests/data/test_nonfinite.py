"""Damaged images (NaN / inf pixels) at the data layer: named when read, dropped on request,
found by ``python -m hetero.data.check``.

One data set (two stacks of 120 noise images) gets a NaN image in the first training batch, an
inf image in the last training batch and a NaN image in the validation set.
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

import hetero.data.check as check
from hetero.data.datamodule import ParticleDataModule
from hetero.data.io.errors import InputError
from hetero.data.io.star import write_star
from hetero.utils.errors import user_message
from tests.data.test_dataset import N_PER_STACK, N, make_star

pytestmark = pytest.mark.filterwarnings("ignore:Data array contains")


def _dm(star: Path, tmp: Path, **kw) -> ParticleDataModule:
    args = dict(batch_size=16, num_workers=0, val_fraction=0.1, normalize=False, sampler="random",
                split_file=str(tmp / "split.npz"))
    return ParticleDataModule(str(star), **{**args, **kw})


@pytest.fixture()
def damaged(tmp_path):
    """(star, {"first": row, "last": row, "val": row}) with the images already damaged."""
    star = make_star(tmp_path / "data")
    dm = _dm(star, tmp_path)
    dm.setup("fit")
    batches = list(dm.make_train_batch_sampler())
    rows = {
        "first": int(dm.train_dataset.indices[batches[0][1]]),
        "last": int(dm.train_dataset.indices[batches[-1][0]]),
        "val": int(dm.val_indices[2]),
    }
    for name, value in (("first", np.nan), ("last", np.inf), ("val", np.nan)):
        stack, index = divmod(rows[name], N_PER_STACK)
        with mrcfile.open(tmp_path / "data" / f"stack{stack}.mrcs", "r+") as m:
            m.data[index, 4, 7] = value
    (tmp_path / "split.npz").unlink()
    return star, rows


def _where(row: int) -> tuple[str, str]:
    stack, index = divmod(row, N_PER_STACK)
    return f"{index + 1}@stack{stack}.mrcs", f"particle row {row + 1} "


def test_every_read_is_checked_and_named(damaged, tmp_path):
    star, rows = damaged
    dm = _dm(star, tmp_path)
    dm.setup("fit")  # no pixel is read at setup without normalisation
    with pytest.raises(InputError) as err:
        next(iter(dm.train_dataloader()))  # the first batch
    image, row = _where(rows["first"])
    assert image in str(err.value) and row in str(err.value) and "NaN" in str(err.value)
    assert "data.drop_nonfinite=true" in str(err.value) and "hetero.data.check" in str(err.value)

    loader = dm.train_dataloader()
    loader.batch_sampler.skip = len(loader) - 1  # straight to the last batch
    with pytest.raises(InputError, match="inf pixel values") as err:
        list(loader)
    image, row = _where(rows["last"])
    assert image in str(err.value) and row in str(err.value)

    with pytest.raises(InputError) as err:
        list(dm.val_dataloader())
    assert all(s in str(err.value) for s in _where(rows["val"]))


def test_a_worker_process_error_reads_as_the_message(damaged, tmp_path):
    star, rows = damaged
    dm = _dm(star, tmp_path, num_workers=1, persistent_workers=False)
    dm.setup("fit")
    with pytest.raises(InputError) as err:
        list(dm.val_dataloader())
    assert "Traceback" in str(err.value)  # what DataLoader makes of it ...
    message = user_message(err.value)
    assert "Traceback" not in message and message.startswith(str(Path(star).parent))  # ... and we print
    assert _where(rows["val"])[0] in message


def test_drop_nonfinite_leaves_the_particles_out_everywhere(damaged, tmp_path, monkeypatch):
    star, rows = damaged
    dropped_file = tmp_path / "run" / "dropped_particles.csv"
    dm = _dm(star, tmp_path, drop_nonfinite=True, dropped_file=str(dropped_file))
    dm.setup("fit")
    bad = sorted(rows.values())
    assert dm.dropped_rows.tolist() == bad
    assert len(dm.table) == N - 3 and dm.info()["n_particles"] == N - 3
    listed = check.read_bad_csv(dropped_file)
    assert [(b.row, Path(b.stack).name, b.index) for b in listed] == [
        (r, f"stack{r // N_PER_STACK}.mrcs", r % N_PER_STACK) for r in bad]
    assert [b.problem for b in listed] == ["inf" if r == rows["last"] else "NaN" for r in bad]
    # every loader runs through without them; the particles keep their input rows
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.predict_dataloader()):
        for batch in loader:
            assert np.isfinite(batch["image"].numpy()).all()
    assert set(dm.table.extra["input_rows"].tolist()) == set(range(N)) - set(bad)
    # subsets are written from this table: the damaged images are in none of them
    out = write_star(tmp_path / "subset.star", dm.table)
    names = out.read_text()
    written = {f"{n.split('@')[0]}@{Path(n.split('@')[1]).name}"
               for n in (line.split()[0] for line in names.splitlines() if "@" in line)}
    assert not {f"{r % N_PER_STACK + 1:06d}@stack{r // N_PER_STACK}.mrcs" for r in bad} & written
    assert len(written) == N - 3

    # a second setup (a resume, the analysis) reuses the list instead of scanning again
    def no_scan(*a, **k):
        raise AssertionError("scanned again")

    monkeypatch.setattr(check, "scan_images", no_scan)
    again = _dm(star, tmp_path, drop_nonfinite=True, dropped_file=str(dropped_file))
    again.setup("fit")
    assert again.dropped_rows.tolist() == bad


def test_check_command_lists_damaged_images_missing_stacks_and_boxes(damaged, tmp_path, capsys):
    star, rows = damaged
    out = tmp_path / "bad.csv"
    assert check.main([str(star), "--csv", str(out)]) == 1
    text = capsys.readouterr().out
    for row in rows.values():
        assert f"particle row {row + 1}: image {_where(row)[0].split('@')[0]}@" in text
    assert "3 with NaN/inf" in text
    assert [b.row for b in check.read_bad_csv(out)] == sorted(rows.values())

    moved = tmp_path / "moved.star"
    moved.write_text(star.read_text().replace("@stack1.mrcs", "@missing.mrcs"))
    assert check.main([str(moved)]) == 1
    text = capsys.readouterr().out
    assert f"missing.mrcs ({N_PER_STACK} particles): missing" in text

    clean = make_star(tmp_path / "clean")
    assert check.main([str(clean)]) == 0
    assert "OK: nothing here stops training" in capsys.readouterr().out
    with mrcfile.new(tmp_path / "clean" / "stack0.mrcs", overwrite=True) as m:  # wrong box
        m.set_data(np.zeros((N_PER_STACK, 32, 32), np.float32))
    assert check.main([str(clean)]) == 1
    assert "images are 32 x 32 px but the particle file says box 48" in capsys.readouterr().out
    assert check.main([str(tmp_path / "nope.star")]) == 2
