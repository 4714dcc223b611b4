"""FolderReplacement: a folder's contents replaced as a whole, the old ones back on failure."""

from __future__ import annotations

import pytest

from hetero.utils.files import FolderReplacement


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _old(folder):
    (folder / "maps").mkdir(parents=True)
    (folder / "maps" / "a.mrc").write_text("old a")
    (folder / "report.html").write_text("old report")
    (folder / "latents").mkdir()
    (folder / "latents" / "z.npy").write_text("cache")


def test_commit_replaces_everything_but_the_kept_entries(tmp_path):
    out = tmp_path / "analysis"
    _old(out)
    repl = FolderReplacement(out, keep=("latents",))
    assert repl.begin() is False and repl.had_contents()
    assert _tree(out) == {"latents/z.npy": "cache"}  # the old files are aside while writing
    (out / "report.html").write_text("new report")
    (out / "latents" / "w.npy").write_text("new cache")
    repl.commit()
    assert _tree(out) == {"report.html": "new report", "latents/z.npy": "cache", "latents/w.npy": "new cache"}
    assert not repl.previous.exists()


def test_rollback_puts_the_old_contents_back(tmp_path):
    out = tmp_path / "analysis"
    _old(out)
    before = _tree(out)
    repl = FolderReplacement(out, keep=("latents",))
    repl.begin()
    (out / "maps").mkdir()
    (out / "maps" / "b.mrc").write_text("new b")
    (out / "report.html").write_text("new report")
    repl.rollback()
    assert _tree(out) == before and not repl.previous.exists()


def test_an_interrupted_replacement_is_restored_by_the_next(tmp_path):
    out = tmp_path / "analysis"
    _old(out)
    before = _tree(out)
    FolderReplacement(out, keep=("latents",)).begin()
    (out / "half-written.mrc").write_text("partial")  # then the process was killed
    repl = FolderReplacement(out, keep=("latents",))
    assert repl.begin() is True  # the previous contents came back first, then went aside again
    repl.rollback()
    assert _tree(out) == before


def test_a_new_folder(tmp_path):
    out = tmp_path / "new" / "analysis"
    repl = FolderReplacement(out)
    repl.begin()
    assert out.is_dir() and not repl.had_contents()
    (out / "x").write_text("x")
    repl.rollback()
    assert out.is_dir() and not any(out.iterdir())


@pytest.mark.parametrize("keep", [(), ("latents",)])
def test_kept_entries_survive_a_rollback(tmp_path, keep):
    out = tmp_path / "analysis"
    _old(out)
    repl = FolderReplacement(out, keep=keep)
    repl.begin()
    repl.rollback()
    assert _tree(out)["latents/z.npy"] == "cache"
