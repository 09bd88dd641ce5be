"""Writing results safely: output paths checked before any work, results built under a temporary name and
renamed into place whole, and OS failures (full disk, read-only folder) turned into one clear OutputError.

A reader of an fxq output path sees the previous result or the complete new one, never a half: files go through
a temporary file and `os.replace`, folders through a temporary folder beside the target that replaces it in one
rename. Files get the mode a plain `open` would give them (0o666 less the umask), folders 0o777 less the umask.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fxq.errors import OutputError

__all__ = [
    "check_output_folder",
    "check_output_file",
    "result_folder",
    "write_atomic",
    "write_json_atomic",
    "os_error_message",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def os_error_message(e: OSError, path: str | os.PathLike | None = None) -> str:
    """One line naming what failed on which path and what to do about it."""
    where = f"'{path or e.filename}'" if (path or e.filename) else "the output"
    fixes = {
        errno.ENOSPC: "the disk is full: free space there or choose another output path",
        errno.EDQUOT: "the disk quota is exhausted: free space there or choose another output path",
        errno.EACCES: "permission denied: choose a folder you can write to",
        errno.EPERM: "permission denied: choose a folder you can write to",
        errno.EROFS: "the file system is read-only: choose another output path",
        errno.ENOTDIR: "a part of the path is a file, not a folder: choose another output path",
        errno.EISDIR: "it is a folder: give a file path",
        errno.ENAMETOOLONG: "the name is too long: choose a shorter output path",
    }
    return f"cannot write {where}: {fixes.get(e.errno, e.strerror or type(e).__name__)}"


def _first_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(path: Path, what: str) -> None:
    """`path` does not exist yet: its nearest existing ancestor must be a folder this process can write into."""
    base = _first_existing(path.parent)
    limit = os.pathconf(base, "PC_NAME_MAX") if base.is_dir() and hasattr(os, "pathconf") else 255
    # the last name needs room for the temporary name's affixes ('.NAME.xxxxxxxx.tmp')
    long = [p for p in path.parts[:-1] if len(os.fsencode(p)) > limit]
    long += [path.name] if len(os.fsencode(path.name)) > limit - 16 else []
    if long:
        raise OutputError(f"{what} '{path}': the name '{long[0][:40]}...' is too long here; choose a shorter name")
    if not base.is_dir():
        raise OutputError(f"{what} '{path}': '{base}' is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{what} '{path}': no permission to write in '{base}'; choose a folder you can write to")
    try:  # os.access trusts mode bits; a read-only mount or a root-owned folder only shows on a real write
        fd, probe = tempfile.mkstemp(prefix=".fxq-probe.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what}: {os_error_message(e, base)}") from None


def check_output_folder(path: str | os.PathLike, force: bool = False, what: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot hold a result: an existing file, a non-empty
    folder (unless `force`: it is then replaced whole), or a place this process cannot write."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(f"{what} '{path}' is a file; give a folder path (it is created) or remove the file")
        if any(path.iterdir()) and not force:
            raise OutputError(
                f"{what} '{path}' is a folder that is not empty; choose a new folder, or pass --force to replace "
                f"it (it is replaced whole once the new result is complete)"
            )
    _check_creatable(path, what)
    return path


def check_output_file(path: str | os.PathLike, force: bool = False, what: str = "--out") -> Path:
    """Refuse, before any work, an output file path that is a folder, an existing file (unless `force`), or a
    place this process cannot write."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} '{path}' is a folder; give a file path such as '{path / 'model.onnx'}'")
    if path.exists() and not force:
        raise OutputError(f"{what} '{path}' exists; choose a new path, or pass --force to replace it")
    _check_creatable(path, what)
    return path


@contextlib.contextmanager
def result_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Build a result in a temporary folder beside `target`; on success it replaces `target` in one rename.

    On any failure or interrupt the temporary folder goes and `target` keeps what it held before.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise OutputError(os_error_message(e, target)) from None
    try:
        yield tmp
        _set_modes(tmp)
        _replace_folder(tmp, target)
    except OSError as e:
        raise OutputError(os_error_message(e, target)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _set_modes(folder: Path) -> None:
    mask = _umask()
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    folder.chmod(0o777 & ~mask)


def _replace_folder(new: Path, target: Path) -> None:
    """`target` becomes `new`: the old one (if any) moves aside first and goes once the new one is in place."""
    aside = None
    if target.exists() or target.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, aside / "previous")
    try:
        os.replace(new, target)
    except BaseException:
        if aside is not None:
            os.replace(aside / "previous", target)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one rename. An interrupt
    or a full disk leaves the old file (or none), and no temporary file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise OutputError(os_error_message(e, path)) from None
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(os_error_message(e, path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """JSON written so that an interrupt leaves either the old file or the new one, never half of one."""
    text = json.dumps(obj, indent=2)
    return write_atomic(path, lambda tmp: tmp.write_text(text))
