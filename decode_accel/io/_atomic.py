"""Atomic file writes: write to a temporary file (or folder) next to the target, then os.replace.

A reader (or a crash) never sees a half-written file: the old file stays until the new one is complete.
Every file the project writes atomically goes through :func:`create_temporary_file`, which creates the
temporary file with mode 0666 less the umask, as ``open()`` does for any tool. (``tempfile.mkstemp``
creates its files 0600, and ``os.replace`` keeps that mode: results that colleagues on a shared server
could not read.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from decode_accel.errors import DecodeAccelError

#: mode requested for new files; the kernel removes the umask's bits from it (as for ``open(path, "w")``)
NEW_FILE_MODE = 0o666


def create_temporary_file(target: str | os.PathLike) -> tuple[int, Path]:
    """Create a new, empty, uniquely named hidden file next to ``target`` (``.<name>.<random>.tmp``).

    The file is created with ``O_EXCL`` (never an existing file) and mode 0666 less the umask. Parent
    folders are created. Returns an open file descriptor (write-only; close it) and the path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, NEW_FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {target}")


def current_umask() -> int:
    """The process's umask, read without changing it where the kernel reports it (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (and put it back at once)
    os.umask(mask)
    return mask


def give_umask_mode(path: str | os.PathLike) -> None:
    """Give a file another library created 0600 (safetensors' ``save_file`` does) the mode ``open()`` gives:
    0666 less the umask."""
    os.chmod(path, NEW_FILE_MODE & ~current_umask())


def temporary_path(target: str | os.PathLike) -> Path:
    """:func:`create_temporary_file`, closed: a path for writers that open the file themselves."""
    fd, tmp = create_temporary_file(target)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``, else delete it."""
    target = Path(path)
    tmp_path = temporary_path(target)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same folder, fsync and ``os.replace``.

    Raises:
        DecodeAccelError: the folder cannot be created or written, or the disk is full (one line naming
            the file); the previous file, if any, is kept.
    """
    path = Path(path)
    try:
        fd, tmp = create_temporary_file(path)
    except OSError as err:
        raise DecodeAccelError(f"cannot write: {err.strerror or err}", path=path,
                               fix="choose a writable folder") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise DecodeAccelError(f"cannot write: {err.strerror or err}", path=path,
                               fix="free disk space or choose a writable folder") from None


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file below ``folder`` (before it is renamed into place)."""
    for f in Path(folder).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def fsync_folder(path: str | os.PathLike) -> None:
    """fsync a folder's entry list (a rename into it is then durable); file systems that cannot are ignored."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems cannot fsync directories; the data files are synced already
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)


def swap_folder(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the complete folder ``tmp`` onto ``target``: an existing ``target`` is renamed aside first and
    removed after, so a reader sees the old folder or the new one, never a mix."""
    tmp, target = Path(tmp), Path(target)
    aside = None
    if target.exists():
        aside = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, aside)
    os.replace(tmp, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def writable_folder(path: str | os.PathLike, *, field: str | None = None,
                    fix: str = "choose a folder you can write to") -> Path:
    """Create folder ``path`` (and its parents) if needed and check that files can be created in it.

    Raises:
        DecodeAccelError: one line naming the folder, ``field`` (the setting or flag it came from) and
            ``fix``, instead of the OSError (not a directory, permission denied, read-only file system).
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DecodeAccelError(f"cannot create this folder: {err.strerror or err}", path=folder, field=field,
                               fix=fix) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DecodeAccelError("cannot write into this folder (permission denied or read-only file system)",
                               path=folder, field=field, fix=fix)
    return folder
