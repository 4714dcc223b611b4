"""FolderReplacement: a folder's contents replaced as a whole; the old ones back on failure,
and every state a killed process can leave repaired by the next replacement."""

from __future__ import annotations

import os

import pytest

from hetero.utils.folder_replacement import FolderBusyError, FolderReplacement


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _old(folder):
    (folder / "maps").mkdir(parents=True)
    (folder / "maps" / "a.mrc").write_text("old a")
    (folder / "report.html").write_text("old report")
    (folder / "latents").mkdir()
    (folder / "latents" / "z.npy").write_text("cache")


def _hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


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
    assert _hidden(tmp_path) == []  # no .previous, no trash, no lock


def test_rollback_puts_the_old_contents_back(tmp_path):
    out = tmp_path / "analysis"
    _old(out)
    before = _tree(out)
    with pytest.raises(RuntimeError), FolderReplacement(out, keep=("latents",)) as folder:
        (folder / "maps").mkdir()
        (folder / "maps" / "b.mrc").write_text("new b")
        (folder / "report.html").write_text("new report")
        raise RuntimeError("a step failed")
    assert _tree(out) == before and _hidden(tmp_path) == []


def _interrupted_begin(out):
    """The states a process killed during or after ``begin`` leaves (without its lock)."""
    repl = FolderReplacement(out, keep=("latents",))
    repl.begin()
    (out / "half-written.mrc").write_text("partial")
    repl._release()  # the process died: its lock is stale (see test_a_dead_owners_lock_is_taken_over)


@pytest.mark.parametrize("moment", ["after_begin", "folder_moved_aside", "cache_moved_back"])
def test_every_interrupted_state_is_repaired_by_the_next_replacement(tmp_path, moment):
    out = tmp_path / "analysis"
    _old(out)
    before = _tree(out)
    previous = tmp_path / ".analysis.previous"
    if moment == "after_begin":
        _interrupted_begin(out)
    elif moment == "folder_moved_aside":  # killed right after the first rename
        os.rename(out, previous)
    else:  # killed after the new folder was made and the cache moved back into it
        os.rename(out, previous)
        out.mkdir()
        os.rename(previous / "latents", out / "latents")
    repl = FolderReplacement(out, keep=("latents",))
    assert repl.begin() is True  # the completed contents came back first, then went aside again
    repl.rollback()
    assert _tree(out) == before and _hidden(tmp_path) == []


def test_an_interrupted_commit_never_costs_the_new_contents(tmp_path):
    out = tmp_path / "analysis"
    _old(out)
    repl = FolderReplacement(out, keep=("latents",))
    repl.begin()
    (out / "report.html").write_text("new report")
    os.rename(repl.previous, tmp_path / ".analysis.trash-1-abc")  # commit killed while deleting
    (tmp_path / ".analysis.trash-1-abc" / "maps" / "a.mrc").unlink()
    repl._release()
    nxt = FolderReplacement(out, keep=("latents",))
    assert nxt.begin() is False  # a trash is not an earlier analysis: nothing to restore
    nxt.rollback()
    assert _tree(out) == {"report.html": "new report", "latents/z.npy": "cache"} and _hidden(tmp_path) == []


def test_a_new_folder(tmp_path):
    out = tmp_path / "new" / "analysis"
    repl = FolderReplacement(out)
    repl.begin()
    assert out.is_dir() and not repl.had_contents()
    (out / "x").write_text("x")
    repl.rollback()
    assert out.is_dir() and not any(out.iterdir())


def test_a_symlinked_folder_is_replaced_beside_its_target(tmp_path):
    real = tmp_path / "disk" / "analysis"
    _old(real)
    link = tmp_path / "run" / "analysis"
    link.parent.mkdir()
    link.symlink_to(real)
    with FolderReplacement(link, keep=("latents",)) as folder:
        assert folder == real.resolve()
        (folder / "report.html").write_text("new")
    assert link.is_symlink() and _tree(link) == {"report.html": "new", "latents/z.npy": "cache"}


def test_a_live_lock_refuses_and_a_dead_owners_lock_is_taken_over(tmp_path):
    out = tmp_path / "analysis"
    _old(out)
    first = FolderReplacement(out, keep=("latents",))
    first.begin()
    with pytest.raises(FolderBusyError, match=f"pid {os.getpid()}"):
        FolderReplacement(out, keep=("latents",)).begin()
    assert _tree(first.previous)["report.html"] == "old report"  # untouched by the refused one
    first.rollback()
    lock = tmp_path / ".analysis.lock"
    lock.mkdir()
    import socket

    (lock / "owner").write_text(f"{socket.gethostname()} pid 999999999\n")  # no such process
    repl = FolderReplacement(out, keep=("latents",))
    repl.begin()
    repl.rollback()
    assert _tree(out)["report.html"] == "old report" and _hidden(tmp_path) == []
