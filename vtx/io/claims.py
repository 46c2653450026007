"""Claims: which process is computing which video of a shared cache.

Any number of ``vtx extract`` processes, on one machine or on many that share a filesystem, may
write one cache. Before working on a video a worker *claims* it: it creates
``feats.h5.claims/<hash of the key>`` with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) and
holds an ``flock`` on it while it works. A claim ends in one of three ways:

* the worker finishes the video (its part is written) and removes the claim;
* the worker dies: the OS drops its lock, and the next worker that finds the claim takes the
  lock and so the claim;
* the worker's machine is lost, and its lock with it or not: the holder refreshes the claim's
  mtime every ``lease / 4`` seconds (a heartbeat thread), and a claim not refreshed for
  ``lease`` seconds is taken over, with a note.

:func:`check_locks` finds, at start, a filesystem on which ``flock`` does not work (NFS without
a lock daemon): claims then rely on the lease alone, which vtx refuses unless the workers are
told apart another way (``--shard K/N``; see docs/FORMAT.md).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from vtx.errors import UsageError

DEFAULT_LEASE_S = 600.0


class LocksUnsupported(UsageError):
    """``flock`` does not work on the cache's filesystem."""


def claim_name(key: str) -> str:
    """File name of a video's claim (and prefix of its part files): a hash of the cache key."""
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def check_locks(folder: Path) -> None:
    """Check that ``flock`` excludes a second open file description in ``folder``.

    Raises:
        LocksUnsupported: locking fails or does not exclude.
    """
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".lock-probe-{os.getpid()}-{threading.get_ident()}"
    a = open(probe, "a+")
    b = open(probe, "a+")
    try:
        try:
            fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise LocksUnsupported(_no_locks(folder, e)) from e
        try:
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # the second lock was refused: locks work
        except OSError as e:
            raise LocksUnsupported(_no_locks(folder, e)) from e
        raise LocksUnsupported(_no_locks(folder, "a second lock on the same file was granted"))
    finally:
        a.close()
        b.close()
        probe.unlink(missing_ok=True)


def _no_locks(folder: Path, why) -> str:
    return (f"file locks do not work in {folder} ({why}), so workers sharing this cache cannot "
            f"tell which videos the others are computing (NFS needs its lock daemon). Either "
            f"write the cache on a filesystem with working locks, or give every worker its own "
            f"--shard K/N and --no-merge, then run `vtx merge` once when all have finished")


def live_claims(folder: Path) -> list[str]:
    """The claim files in ``folder`` whose holder is alive (its lock is held)."""
    live = []
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            fh = open(path, "r")
        except FileNotFoundError:
            continue
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
            except BlockingIOError:
                live.append(path.name)
    return live


class Claims:
    """The claims this process holds on one cache.

    Args:
        folder: ``feats.h5.claims/``.
        lease: seconds after which a claim whose holder stopped refreshing it is taken over.
        locks: whether ``flock`` works here (:func:`check_locks`); without it a claim is
            held only by its lease.
        log: where notes go.
    """

    def __init__(self, folder: Path, lease: float = DEFAULT_LEASE_S, locks: bool = True,
                 log=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lease, self.locks = float(lease), locks
        self.log = log or (lambda msg: None)
        self._held: dict[str, object] = {}  # key -> open file (holding the flock)
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def path(self, key: str) -> Path:
        return self.folder / claim_name(key)

    def acquire(self, key: str) -> bool:
        """Claim video ``key``. False when another live worker holds it."""
        path = self.path(key)
        info = json.dumps({"key": key, "host": socket.gethostname(), "pid": os.getpid(),
                           "time": time.time()})
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                fh = self._take_over(path, key)
                if fh is None:
                    return False
            else:
                fh = os.fdopen(fd, "r+")
                if self.locks:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not self._still_ours(path, fh):
                fh.close()
                continue  # removed or replaced by another worker meanwhile: try again
            fh.seek(0)
            fh.truncate()
            fh.write(info)
            fh.flush()
            with self._mutex:
                self._held[key] = fh
            return True
        return False

    def _take_over(self, path: Path, key: str):
        """An existing claim: ours to take when its holder died (lock free) or its lease ran
        out. Returns the open, locked file, or None."""
        try:
            fh = open(path, "r+")
        except FileNotFoundError:
            return None  # released meanwhile; the caller retries the O_EXCL create
        try:
            if self.locks:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fh  # the holder died: the OS dropped its lock
                except BlockingIOError:
                    pass
            age = time.time() - os.fstat(fh.fileno()).st_mtime
            if age < self.lease:
                fh.close()
                return None
            holder = fh.read().strip() or "unknown"
            self.log(f"vtx: note: taking over the claim on {key} (not refreshed for "
                     f"{age:.0f} s, lease {self.lease:.0f} s; holder {holder})")
            return fh
        except BaseException:
            fh.close()
            raise

    @staticmethod
    def _still_ours(path: Path, fh) -> bool:
        try:
            return os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self, key: str) -> None:
        """End the claim on ``key`` (its part is written, or its failure recorded)."""
        with self._mutex:
            fh = self._held.pop(key, None)
        if fh is None:
            return
        if self._still_ours(self.path(key), fh):
            self.path(key).unlink(missing_ok=True)
        fh.close()

    def held(self) -> list[str]:
        with self._mutex:
            return list(self._held)

    def close(self) -> None:
        """Release every claim (the videos are left for other workers)."""
        self._stop.set()
        for key in self.held():
            self.release(key)

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.05, self.lease / 4)):
            with self._mutex:
                files = list(self._held.values())
            for fh in files:
                try:
                    os.utime(fh.fileno())
                except OSError as e:
                    if e.errno not in (errno.EBADF, errno.ENOENT):
                        raise

    def __enter__(self) -> "Claims":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
