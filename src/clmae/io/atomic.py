"""Files and folders that appear whole or not at all: the one implementation every writer uses.

* :func:`atomic_write` — ``write(tmp)`` fills a temporary file beside the target, which is flushed
  to disk and renamed over the target. A reader sees the old file or the new one, never half of one;
  on any error the old file is untouched and the temporary file is gone.
* :func:`staged_folder` — a folder built under a temporary name beside the target and renamed into
  place when the block succeeds. An existing target is swapped out whole (its other files carried
  over), never replaced file by file; on any error nothing new is left and the old folder is intact.

Temporary names are unique (``.NAME.<random>.tmp``), so two writers of the same file never share
one. They are created by ``open``/``mkdir`` with the usual 0666/0777 mode, so the kernel applies the
umask exactly as for a plain ``open``, and a writer that gives its file another mode (safetensors
makes 0600 files) is corrected to that; nothing reads or changes the process umask.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_ATTEMPTS = 100


def temp_prefix(path: Path) -> str:
    """The start of every temporary name for ``path`` (``.NAME.``); they end in ``.tmp``."""
    return f".{Path(path).name}."


def _unique(path: Path, create: Callable[[str], None]) -> Path:
    """A fresh ``.NAME.<random>.tmp`` beside ``path``, made by ``create`` (which must fail if it exists).

    What ``tempfile.mkstemp``/``mkdtemp`` do, but with the usual mode instead of their private 0600/0700.
    """
    for _ in range(_ATTEMPTS):
        candidate = path.parent / f"{temp_prefix(path)}{os.urandom(6).hex()}.tmp"
        try:
            create(str(candidate))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def _new_file(name: str) -> None:
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Delete the temporary files and folders of ``path`` that a killed writer left behind.

    Only for targets with a single writer (a run folder's checkpoints): a concurrent writer's
    temporary file would be removed too.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(glob.escape(temp_prefix(path)) + "*.tmp"):
        try:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (power loss); not every platform can open a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(name: str | Path) -> None:
    with open(name, "rb") as fh:
        os.fsync(fh.fileno())


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the file it wrote over ``path``; errors propagate unchanged.

    ``tmp_path`` exists (empty) when ``write`` is called; writers that reopen it by name keep its mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique(path, _new_file)
    try:
        mode = stat.S_IMODE(tmp.stat().st_mode)  # what open() gives a new file here: 0666 less the umask
        write(str(tmp))
        if stat.S_IMODE(tmp.stat().st_mode) != mode:  # a writer that replaced the file (safetensors: 0600)
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``data`` into ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """``text`` into ``path`` atomically (see :func:`atomic_write`)."""
    return write_bytes(path, text.encode(encoding))


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) the entries of ``old`` that ``new`` does not replace into ``new``."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or target.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _usual_modes(folder: Path) -> None:
    """Give the files under ``folder`` the mode a plain ``open`` gives (writers such as safetensors make
    0600 files), derived from ``folder``'s own mode (made 0777 less the umask); executables stay so. Sync them."""
    allowed = stat.S_IMODE(folder.stat().st_mode)
    for f in folder.rglob("*"):
        if f.is_symlink():
            continue
        if f.is_dir():
            os.chmod(f, allowed)
            continue
        current = stat.S_IMODE(f.stat().st_mode)
        wanted = (0o777 if current & 0o111 else 0o666) & allowed
        if current != wanted:
            os.chmod(f, wanted)
        _fsync_file(f)


@contextmanager
def staged_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to build in, renamed to ``path`` when the block succeeds.

    When ``path`` already is a folder, its entries that the new folder does not hold are carried
    over (hard links, so nothing is copied twice), then the old folder is renamed aside, the new one
    into place, and the old one removed: ``path`` is never half old and half new. On any error the
    temporary folder (and any parent folder made for it) is removed and an existing ``path`` is as it
    was; errors propagate unchanged.
    """
    path = Path(path)
    if path.is_symlink() and path.is_dir():  # a link to the folder: the folder it names is swapped, the link stays
        path = Path(os.path.realpath(path))
    made = next((p for p in reversed(path.parents) if not p.exists()), None)  # the first folder we create
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _unique(path, lambda name: os.mkdir(name, 0o777))
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    old = None
    try:
        yield tmp
        _usual_modes(tmp)
        if path.is_dir() and not path.is_symlink():
            _carry_over(path, tmp)
            os.chmod(tmp, path.stat().st_mode & 0o7777)
            old = _unique(path, lambda name: os.mkdir(name, 0o700))
            os.replace(path, old)  # over the empty placeholder that reserved the name
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                old = None
                raise
        else:
            os.rename(tmp, path)  # fails if a file or a folder appeared there meanwhile
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made is not None and not path.exists():
            shutil.rmtree(made, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
