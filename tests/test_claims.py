"""Claims on videos of a shared cache: atomic, released when the holder dies, taken over after
the lease, and a filesystem without working locks is found at start."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from vtx.io import claims as claims_mod
from vtx.io.claims import Claims, LocksUnsupported, check_locks


def test_a_claim_excludes_other_holders_until_released(tmp_path):
    a, b = Claims(tmp_path), Claims(tmp_path)
    try:
        assert a.acquire("v1.mp4")
        assert not b.acquire("v1.mp4")  # a second holder, even in this process, is refused
        assert b.acquire("v2.mp4")
        a.release("v1.mp4")
        assert b.acquire("v1.mp4")
        assert sorted(b.held()) == ["v1.mp4", "v2.mp4"]
    finally:
        a.close()
        b.close()
    assert not any(p for p in tmp_path.iterdir() if not p.name.startswith("."))


def test_the_claim_of_a_killed_process_is_taken_at_once(tmp_path):
    code = ("import sys, time; from vtx.io.claims import Claims; c = Claims(sys.argv[1]); "
            "assert c.acquire('v.mp4'); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with Claims(tmp_path) as c:
            assert not c.acquire("v.mp4")  # alive: refused
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert c.acquire("v.mp4")  # dead: its lock went with it
    finally:
        proc.kill()
        proc.wait()


def test_a_claim_not_refreshed_for_the_lease_is_taken_over_with_a_note(tmp_path):
    """A holder that stops (SIGSTOP: a hung or unreachable machine) keeps its lock but no
    longer refreshes its claim; after the lease another worker takes it over."""
    code = ("import sys, time; from vtx.io.claims import Claims; c = Claims(sys.argv[1], "
            "lease=0.5); assert c.acquire('v.mp4'); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    notes = []
    try:
        assert proc.stdout.readline().strip() == "held"
        proc.send_signal(signal.SIGSTOP)
        with Claims(tmp_path, lease=0.5, log=notes.append) as other:
            assert not other.acquire("v.mp4")  # still within the lease
            time.sleep(0.8)
            assert other.acquire("v.mp4")
        assert notes and "taking over the claim on v.mp4" in notes[0]
    finally:
        proc.kill()
        proc.wait()


def test_heartbeats_keep_a_live_claim(tmp_path):
    with Claims(tmp_path, lease=0.4) as holder, Claims(tmp_path, lease=0.4) as other:
        assert holder.acquire("v.mp4")
        time.sleep(0.8)  # twice the lease: the heartbeat kept it fresh
        assert not other.acquire("v.mp4")


def test_without_locks_claims_hold_by_lease(tmp_path):
    with Claims(tmp_path, lease=0.3, locks=False) as a, \
            Claims(tmp_path, lease=0.3, locks=False) as b:
        assert a.acquire("v.mp4") and not b.acquire("v.mp4")


def test_locks_that_work_pass_the_probe(tmp_path):
    check_locks(tmp_path)


@pytest.mark.parametrize("failure", ["enolck", "granted"])
def test_a_filesystem_without_working_locks_is_refused_clearly(tmp_path, monkeypatch, failure):
    real = claims_mod.fcntl.flock

    def flock(fh, op):
        if failure == "enolck":
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        if op & claims_mod.fcntl.LOCK_UN:
            return real(fh, op)
        return None  # every lock "granted": no exclusion at all

    monkeypatch.setattr(claims_mod.fcntl, "flock", flock)
    with pytest.raises(LocksUnsupported) as e:
        check_locks(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "--shard" in msg and "vtx merge" in msg
