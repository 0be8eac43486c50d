"""Files and folders appear whole or not at all (clmae.io.atomic), for every writer that uses it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clmae.evaluation.results import write_report
from clmae.io import atomic


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_two_writers_of_one_report_do_not_share_a_temporary_file(tmp_path, monkeypatch):
    """The second writer starts while the first has written its temporary file but not renamed it.

    With one fixed temporary name the second overwrote and renamed the first's file away, and the
    first failed (or published the second's content as its own)."""
    target = tmp_path / "eval-knn-digits.json"
    real_replace = os.replace
    nested = []

    def replace(src, dst):
        if not nested:  # the first writer, about to publish: a second writer runs to completion now
            nested.append(src)
            write_report({"writer": "second"}, target)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_report({"writer": "first"}, target)
    monkeypatch.undo()
    assert '"first"' in target.read_text()  # the last rename wins, and it is whole
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "a temporary file was left behind"


def test_atomic_write_failure_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def write(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic.atomic_write(target, write)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_written_files_and_folders_get_the_mode_a_plain_open_gives(tmp_path):
    mask = _umask()
    file = atomic.write_text(tmp_path / "sub" / "f.txt", "x")
    assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask

    def private_writer(tmp):  # as safetensors' save_file: a new 0600 file in place of the given one
        Path(tmp).unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    private = atomic.atomic_write(tmp_path / "w.safetensors", private_writer)
    assert stat.S_IMODE(private.stat().st_mode) == 0o666 & ~mask
    with atomic.staged_folder(tmp_path / "folder") as tmp:
        (tmp / "a").write_text("a")
        private_writer(tmp / "b")
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o777 & ~mask
    for name in ("a", "b"):
        assert stat.S_IMODE((tmp_path / "folder" / name).stat().st_mode) == 0o666 & ~mask


def test_staged_folder_failure_leaves_nothing_not_even_the_parents_it_made(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic.staged_folder(tmp_path / "new" / "parent" / "out") as tmp:
            (tmp / "a").write_text("a")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def old_folder(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("old model")
    (out / "config.json").write_text("old config")
    (out / "notes.md").write_text("the user's notes")
    (out / "sub").mkdir()
    (out / "sub" / "x").write_text("x")
    return out


def test_staged_folder_swaps_an_existing_folder_whole_and_keeps_its_other_files(old_folder):
    with atomic.staged_folder(old_folder) as tmp:
        (tmp / "model.safetensors").write_text("new model")
        (tmp / "config.json").write_text("new config")
    assert (old_folder / "model.safetensors").read_text() == "new model"
    assert (old_folder / "config.json").read_text() == "new config"
    assert (old_folder / "notes.md").read_text() == "the user's notes"
    assert (old_folder / "sub" / "x").read_text() == "x"
    assert [p.name for p in old_folder.parent.iterdir()] == ["out"]


@pytest.mark.parametrize("where", ["while writing", "at the swap"])
def test_staged_folder_failure_keeps_the_existing_folder_as_it_was(old_folder, monkeypatch, where):
    before = {p.relative_to(old_folder): p.read_text() for p in old_folder.rglob("*") if p.is_file()}
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst) == old_folder and Path(src).name.startswith(".out.") and not calls:
            calls.append(src)
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    calls: list = []
    if where == "at the swap":
        monkeypatch.setattr(os, "rename", rename)
    with pytest.raises((OSError, RuntimeError)):
        with atomic.staged_folder(old_folder) as tmp:
            (tmp / "model.safetensors").write_text("new model")
            if where == "while writing":
                raise RuntimeError("the check failed")
    monkeypatch.undo()
    after = {p.relative_to(old_folder): p.read_text() for p in old_folder.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in old_folder.parent.iterdir()] == ["out"]


def test_staged_folder_through_a_link_swaps_the_folder_it_names(old_folder):
    link = old_folder.parent / "link"
    link.symlink_to(old_folder)
    with atomic.staged_folder(link) as tmp:
        (tmp / "model.safetensors").write_text("new model")
    assert link.is_symlink() and (link / "model.safetensors").read_text() == "new model"
    assert (old_folder / "notes.md").read_text() == "the user's notes"
    assert sorted(p.name for p in old_folder.parent.iterdir()) == ["link", "out"]
