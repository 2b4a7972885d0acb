"""The kit's one way to write, replace and remove files: atomic, binary and the same on every OS.

Everything that writes (the patch engine, checkpoint export and placement, the registry, the
micro-sam record, the segment cache, reports) goes through here, so the differences between
Linux, macOS and Windows live in this module only:

* files are opened with ``O_BINARY`` where the OS has it (Windows would otherwise turn every
  0x0A byte of a checkpoint into 0x0D 0x0A);
* a replaced file keeps its mode bits, so ``unpatch`` also restores permissions;
* a folder is fsynced only where the OS can open one (POSIX); Windows cannot, and its
  ``MoveFileEx`` replace is already durable enough there;
* a file another process holds open (Windows, antivirus scanners) is retried briefly, then
  reported by name as a :class:`FileBusyError` that says re-running the command completes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from medico_adapters.errors import FileBusyError

#: suffix of every temporary file the kit creates beside a target.
TMP_SUFFIX = ".medico-adapters.tmp"
#: what ``write_file`` accepts: the bytes themselves, or a function that writes them to a file.
Payload = bytes | Callable[[BinaryIO], object]

_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
# Windows reports a file held open elsewhere as PermissionError (sharing violation); retry a little.
_BUSY_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
_WINDOWS = os.name == "nt"


def write_file(path: str | os.PathLike, payload: Payload) -> Path:
    """Write ``payload`` to ``path`` in binary mode and fsync it (no rename: a staging step)."""
    path = Path(path)
    fd = os.open(path, _WRITE_FLAGS, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(payload):
                payload(f)
            else:
                f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def temp_path(target: str | os.PathLike, unique: bool = False) -> Path:
    """The temporary path beside ``target`` (unique per call when several writers may race)."""
    target = Path(target)
    tag = f".{os.getpid()}.{uuid.uuid4().hex[:8]}" if unique else ""
    return target.with_name(f"{target.name}{tag}{TMP_SUFFIX}")


def _retrying(action: Callable[[], object], path: Path, what: str) -> None:
    for delay in (*_BUSY_RETRIES, None):
        try:
            action()
            return
        except PermissionError:
            if not _WINDOWS:
                raise
            if delay is None:
                raise FileBusyError(
                    f"{path}: cannot {what} it, another program holds it open; close that program "
                    "(or wait for the virus scanner) and run the same command again to complete the change"
                ) from None
            time.sleep(delay)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move ``src`` over ``dst`` atomically, keeping ``dst``'s mode bits if it exists."""
    src, dst = Path(src), Path(dst)
    with contextlib.suppress(FileNotFoundError):
        os.chmod(src, os.stat(dst).st_mode & 0o7777)
    _retrying(lambda: os.replace(src, dst), dst, "replace")


def remove(path: str | os.PathLike) -> None:
    """Delete a file if it exists (retrying briefly where another process holds it)."""
    path = Path(path)
    _retrying(lambda: path.unlink(missing_ok=True), path, "remove")


def remove_empty_dir(path: str | os.PathLike) -> None:
    """Delete a folder if it exists and is empty (a folder the kit created and emptied again)."""
    path = Path(path)
    if path.is_dir() and not any(path.iterdir()):
        _retrying(path.rmdir, path, "remove")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable, where the OS lets a folder be opened (not Windows)."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(
    path: str | os.PathLike, payload: Payload, *, mkdir: bool = True, tmp: str | os.PathLike | None = None
) -> Path:
    """Write ``payload`` to ``path`` all-or-nothing: a temporary file beside it, fsync, rename.

    A reader sees the old file or the new one, never a part; on any failure the temporary
    file is removed and the old file is untouched. ``tmp`` fixes the temporary name (for
    writers that hold a lock and want a killed run's leftover to be overwritten next time).
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else temp_path(path, unique=True)
    try:
        write_file(tmp, payload)
        replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path that ends like ``path``, moved over it when the block succeeds.

    For writers that open the file themselves and pick the format from its name (SimpleITK,
    Pillow): ``mask.nii.gz`` is staged as ``.<random>.medico-adapters-tmp.mask.nii.gz``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex[:8]}.medico-adapters-tmp.{path.name}")
    try:
        yield tmp
        replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str, **kwargs) -> Path:
    """``atomic_write`` of UTF-8 text (never the locale's encoding), newlines kept as given."""
    return atomic_write(path, text.encode("utf-8"), **kwargs)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
