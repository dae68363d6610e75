"""Files written whole or not at all (plans, cluster files, calibration tables, checkpoints), and
the checks every output path passes before a command starts its work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from autoddl.errors import UserError


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file beside ``path`` (mode as ``open`` would give), then
    move it to ``path``: a reader sees the old file or the whole new one, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have made
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (:func:`write_atomic`)."""
    def write(tmp: Path) -> None:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:
            f.write(text)
    write_atomic(path, write)


def check_output(path: str | os.PathLike | None, option: str,
                 inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """The file ``option`` will write, checked before any work is done: a non-empty path whose
    folder exists and takes new files, that is not a folder, not a device or other non-regular
    file, and not one of the command's ``inputs`` (followed through links). Returns the path to
    write to (a link's target, so a link stays a link). :class:`UserError` otherwise."""
    if path is None or not str(path).strip():
        raise UserError(f"{option}: empty file name; give a path such as plan.json")
    given = Path(os.path.expanduser(str(path)))
    target = Path(os.path.realpath(given))
    for other in inputs:
        if other and os.path.exists(other) and os.path.realpath(other) == str(target):
            raise UserError(f"{option} {str(path)!r} is an input of this command "
                            f"({str(other)!r}); writing it would destroy it: give another file")
    if target.is_dir():
        raise UserError(f"{option} {str(path)!r} is a folder; give a file name inside it, "
                        f"e.g. {str(given / 'plan.json')!r}")
    if target.exists() and not target.is_file():
        raise UserError(f"{option} {str(path)!r} is not a regular file (a device, pipe or "
                        "socket); give a path to a file")
    folder = target.parent
    if not folder.is_dir():
        raise UserError(f"{option}: folder {str(given.parent)!r} does not exist; create it "
                        "first or give another path")
    if target.exists() and not os.access(target, os.W_OK):
        raise UserError(f"{option} {str(path)!r} is read-only; give another file or make it "
                        "writable")
    _probe_writable(folder, option)
    return target


def replaced_note(path: str | os.PathLike) -> str:
    """What a command adds to "written to PATH" when PATH names an existing file (checked
    before the command writes it): ``" (replaced the file that was there)"``, else ``""``."""
    return " (replaced the file that was there)" if Path(path).is_file() else ""


def _probe_writable(folder: Path, option: str) -> None:
    """Raise :class:`UserError` unless a new file can be created in ``folder`` (tried, since
    permission bits do not tell for root or read-only file systems)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".autoddl-probe.", dir=folder)
    except OSError as exc:
        raise UserError(f"{option}: cannot write in folder {str(folder)!r} "
                        f"({exc.strerror}); give a writable place") from None
    os.close(fd)
    os.unlink(probe)


def check_output_folder(path: str | os.PathLike | None, option: str) -> Path:
    """A folder ``option`` will write files into (created if missing, its parent must exist),
    checked to take new files; :class:`UserError` if it is a file or not writable."""
    if path is None or not str(path).strip():
        raise UserError(f"{option}: empty folder name; give a folder path")
    folder = Path(os.path.expanduser(str(path)))
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {str(path)!r} exists and is not a folder; give a folder")
    if not folder.exists():
        if not folder.resolve().parent.is_dir():
            raise UserError(f"{option}: folder {str(folder.parent)!r} does not exist")
        try:
            folder.mkdir()
        except OSError as exc:
            raise UserError(f"{option}: cannot create folder {str(path)!r} "
                            f"({exc.strerror}); give a writable place") from None
    _probe_writable(folder, option)
    return folder
