"""Disk space and write access for the HDF5 writers (cache parts, merges, repairs).

HDF5 buffers its writes, so a full disk often surfaces only when a file is flushed or closed,
and h5py can then crash the process (a segmentation fault, seen with HDF5 2.0 on a full tmpfs).
vtx therefore never lets HDF5 be the one to find out that the disk is full:

* :func:`create_reserved` makes a new HDF5 file whose space is *reserved* first: a tiny HDF5
  skeleton (built in memory) is written with plain ``os.write``, then the file is extended with
  ``posix_fallocate`` by the bytes the step will need. A full disk fails there, as a plain
  ``OSError(ENOSPC)``, before HDF5 writes anything. HDF5 then allocates inside the reserved
  bytes (it appends at its own end-of-allocation mark, not at the file's end) and truncates the
  file to what it used when it closes it.
* :func:`reserve` does the same for an existing file (the copy a merge writes into).
* :func:`check_free` compares what a step needs with what the file system has free, before the
  step starts, and :func:`is_disk_full` / :func:`is_read_only` recognise the errors both from
  the OS and from HDF5 (whose messages carry the errno only as text).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

__all__ = ["create_reserved", "free_bytes", "fsync_dir", "fsync_file", "human", "is_disk_full",
           "is_read_only", "reserve", "writable_reason"]

_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it) to the disk, where the file system can."""
    try:
        fsync_file(path)
    except OSError:  # some file systems do not support fsync on folders
        pass


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (an OSError, or an h5py error carrying HDF5's message) means no space left
    on the device (or the disk quota is exhausted)."""
    if isinstance(e, OSError) and e.errno in _FULL:
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "errno = 28",
                                   "Disk quota exceeded", "errno = 122"))


def is_read_only(e: BaseException) -> bool:
    """Whether ``e`` means the place cannot be written (read-only file system, no permission)."""
    if isinstance(e, OSError) and e.errno in _READ_ONLY:
        return True
    text = str(e)
    return any(s in text for s in ("Read-only file system", "errno = 30", "Permission denied",
                                   "errno = 13"))


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to an unprivileged user on the file system of ``path`` (or of its nearest
    existing folder)."""
    return shutil.disk_usage(_existing(Path(path))).free


def writable_reason(folder: str | os.PathLike) -> str | None:
    """None when files can be created in ``folder`` (or, if it does not exist yet, in its
    nearest existing parent); otherwise why not, in words."""
    target = _existing(Path(folder))
    if not target.is_dir():
        return f"{target} is not a folder"
    if os.access(target, os.W_OK | os.X_OK):
        return None
    try:  # access() answers EROFS for a read-only mount even to root
        ro = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
    except OSError:
        ro = False
    if ro:
        return f"{target} is on a read-only file system"
    return f"no permission to write in {target}"


def human(n: float) -> str:
    """A byte count for people: ``512 B``, ``3.4 MB``, ``1.20 GB`` (powers of 1000)."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover


def reserve(path: str | os.PathLike, size: int) -> None:
    """Make ``path`` at least ``size`` bytes long with the blocks actually allocated.

    Raises:
        OSError: ``ENOSPC`` (or ``EDQUOT``) when the file system cannot hold it; the file keeps
            its old length then.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        start = os.fstat(fd).st_size
        if size <= start:
            return
        try:
            os.posix_fallocate(fd, start, size - start)
            return
        except AttributeError:  # pragma: no cover - no posix_fallocate on this platform
            pass
        except OSError as e:
            if e.errno in _FULL:
                os.ftruncate(fd, start)
                raise
            # EOPNOTSUPP, EINVAL: this file system cannot allocate; write zeros instead
        try:
            block = bytes(1 << 20)
            pos = start
            while pos < size:
                pos += os.pwrite(fd, block[: min(len(block), size - pos)], pos)
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def create_reserved(path: str | os.PathLike, size: int, attrs: dict | None = None) -> None:
    """Create a new HDF5 file at ``path`` (which must not exist) with root ``attrs``, and reserve
    ``size`` more bytes for what will be written into it (open it with ``h5py.File(path, "r+")``).

    Raises:
        OSError: ``ENOSPC`` when the skeleton or the reservation does not fit (the file is
            removed then), ``EEXIST`` when ``path`` exists.
    """
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    image = buf.getvalue()
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            view = memoryview(image)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        reserve(path, len(image) + size)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@contextmanager
def replaced_atomically(tmp: Path, target: Path, full: Callable[[], str]) -> Iterator[None]:
    """Write ``tmp`` inside the block; then fsync it, rename it over ``target`` and fsync the
    folder. On any error ``tmp`` is removed and ``target`` is untouched; a full disk raises
    :class:`vtx.errors.DiskFull` with the message ``full()`` (called then, so that it can
    report the space free at that moment)."""
    from vtx.errors import DiskFull

    try:
        yield
        fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFull(full()) from e
        raise
