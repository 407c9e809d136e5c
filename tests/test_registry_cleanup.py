"""The registry leaves for good: it removes what no segment names any more (after a grace
period), recovers named scopes with the shared steps, and survives names it does not know."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest

import _kill_workers as K
import _scope_workers
import shmfeed
from shmfeed import _gc, _names, _process, _registry_client, _shm
from shmfeed import _layout as L

pytestmark = pytest.mark.timeout(60)

BOUND = 15.0  # seconds from the leftovers' making to a registry gone
PROCEED_BOUND = 2.0  # a scope usable again after a death (SPEC: within 1 s of detection)


def _make_orphaned_locks(namespace: str, count: int) -> list[str]:
    """Lock semaphores made as a segment's creation makes them, before publishing it, and no
    segment ever: what a process killed between the two steps leaves. Their paths."""
    paths = []
    for _ in range(count):
        name = _names.lock_semaphore(namespace, _names.new_id())
        _shm.create_semaphore(name, 1).close()
        paths.append(_names.semaphore_path(name))
    return paths


def _gone(pid: int) -> bool:
    return _process.start_ticks(pid) is None


def test_orphaned_locks_go_after_the_grace_period_then_the_registry_leaves(namespace):
    grace = _gc.LOCK_GRACE_SECONDS
    old = _make_orphaned_locks(namespace, 3)
    for path in old:  # made longer ago than the grace period
        os.utime(path, (time.time() - grace - 1,) * 2)
    young = _make_orphaned_locks(namespace, 1)  # as a segment being created right now has
    started, born = time.monotonic(), os.stat(young[0]).st_mtime
    _registry_client.ensure_running(namespace)
    pid = K.registry_pid(namespace)
    K.wait_until(lambda: not any(map(os.path.exists, old)), BOUND, "the old orphaned locks removed")
    K.premise(time.time() - born < grace, "the young lock still younger than the grace period")
    assert os.path.exists(young[0]), "a lock younger than the grace period (a creation in progress) was removed"
    K.wait_until(lambda: not _gc.namespace_entries(namespace), BOUND, "the young lock removed once old")
    assert time.time() - born >= grace, "the young lock was removed before the grace period ended"
    K.wait_until(lambda: _gone(pid), BOUND, "the registry leaving the empty namespace")
    assert time.monotonic() - started < BOUND


# What the registry does with random bytes does not depend on how their writer started.
@pytest.mark.parametrize("mp_context", ["forkserver"], indirect=True)
def test_segments_overwritten_with_random_bytes_go_and_the_registry_leaves(namespace, mp_context, monkeypatch):
    # A channel, its subscription's error channel, a feed and a scope outlive the process
    # that used them; then their bytes are overwritten, so that no segment names the lock
    # semaphores any more. The registry must neither crash nor keep them (and itself) for good.
    monkeypatch.setenv("SHMFEED_NO_REGISTRY", "1")  # nothing cleans up before the overwrite
    reader, writer = mp_context.Pipe(duplex=False)
    with K.running(mp_context, (K.leave_segments, (namespace, writer))) as (child,):
        K.premise(reader.poll(30), "the child made its objects")
        K.kill(reader.recv())
    segments = [f"/dev/shm/{e}" for e in _gc.namespace_entries(namespace) if not e.startswith("sem.")]
    K.premise(len(segments) == 4, f"channel, error channel, feed and scope left: {segments}")
    for path in segments:
        with open(path, "r+b") as segment:
            segment.write(os.urandom(os.fstat(segment.fileno()).st_size))
    monkeypatch.delenv("SHMFEED_NO_REGISTRY")
    started = time.monotonic()
    _registry_client.ensure_running(namespace)
    pid = K.registry_pid(namespace)
    K.wait_until(lambda: not _gc.namespace_entries(namespace), BOUND, "the segments and their locks removed")
    K.wait_until(lambda: _gone(pid), BOUND, "the registry leaving the empty namespace")
    assert time.monotonic() - started < BOUND


@pytest.mark.parametrize("with_owner", [True, False], ids=["owner", "no owner"])
def test_a_named_scope_is_usable_again_after_a_kill_while_its_lock_is_held(namespace, mp_context, with_owner):
    scope, feed = shmfeed.SubscriptionScope("job"), shmfeed.Feed()
    mine = scope.track(feed.subscribe(shmfeed.Channel()))
    K.registry_pid(namespace)
    reader, writer = mp_context.Pipe(duplex=False)
    tracker = K.SenderThread(lambda _: scope.track(feed.subscribe(shmfeed.Channel())), [None])
    with K.running(mp_context, (_scope_workers.hold_scope_lock, (namespace, "job", with_owner, writer))) as (child,):
        K.premise(reader.poll(30) and reader.recv() == child.pid, "the child holds the scope's lock")
        K.premise(scope.count() == 2, "the child tracked one subscription")
        K.wait_watched(namespace, child.pid)
        killed_at = K.kill(child.pid)
        tracker.start()  # waits for the scope's lock
        tracker.join(PROCEED_BOUND)
        try:
            assert not tracker.is_alive(), "track still waits for the lock of the killed process"
        finally:
            if tracker.is_alive():
                scope._shared.segment_lock.release()  # let the test end
            tracker.finish(10)
    assert tracker.times[0] - killed_at < PROCEED_BOUND
    K.wait_until(lambda: scope.count() == 2, PROCEED_BOUND, "the killed process's entry dropped")
    theirs = tracker.returns[0]
    scope.close()
    assert scope.count() == 0
    assert mine.err().recv(timeout=5) is None and theirs.err().recv(timeout=5) is None
    assert scope.track(feed.subscribe(shmfeed.Channel())) is None


def test_a_lock_whose_holder_died_outside_every_attach_slot_is_released(namespace, mp_context):
    # No slot names the holder (a daemon thread that had left them, stopped by its process's
    # exit): only the pid in the owner word tells the registry of the death. A release
    # waited for this lock without end in a finalizer before the registry read owner words.
    channel = shmfeed.Channel(capacity=4)
    K.registry_pid(namespace)
    reader, writer = mp_context.Pipe(duplex=False)
    target = (K.hold_channel_lock_unattached, (namespace, channel._core.segment_name, writer))
    with K.running(mp_context, target) as (child,):
        K.premise(reader.poll(30) and reader.recv() == child.pid, "the child holds the channel's lock")
        K.premise(child.pid not in {pid for pid, _ in L.attached_processes(channel._core.words)},
                  "the child is in no attach slot")
        killed_at = K.kill(child.pid)
    channel.send("works again", timeout=PROCEED_BOUND)
    assert time.monotonic() - killed_at < PROCEED_BOUND
    assert channel.recv(timeout=5) == "works again"
    channel.close()


def _plant(namespace: str) -> list[str]:
    """Files with names of the namespace that the library never makes (owner-only, as ours)."""
    start = _names.prefix(namespace)
    names = [f"{start}t0.0", f"sem.{start}wnothex", f"sem.{start}l", f"sem.{start}q1", f"{start}cnothex",
             f"{start}fzz", f"{start}s", f"{start}c0123456789abcdef.xjunk", f"{start}c.t"]
    paths = [f"{_names.SHM_DIR}/{name}" for name in names]
    for path in paths:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    return paths


def test_names_the_library_never_makes_crash_neither_gc_nor_the_registry(namespace, mp_context):
    channel = shmfeed.Channel(capacity=4)
    pid = K.registry_pid(namespace)
    planted = _plant(namespace)
    try:
        for dry_run in ([], ["--dry-run"]):
            result = subprocess.run([sys.executable, "-m", "shmfeed._cli", "gc", "--namespace", namespace, *dry_run],
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
        assert all(map(os.path.exists, planted)), "gc removed a name it does not know"
        # The registry keeps recovering: a process killed holding the channel's send lock.
        reader, writer = mp_context.Pipe(duplex=False)
        with K.running(mp_context, (K.hold_channel_lock, (namespace, channel, True, writer))) as (child,):
            K.premise(reader.poll(30) and reader.recv() == child.pid, "the child holds the channel's lock")
            K.wait_watched(namespace, child.pid)
            K.kill(child.pid)
        channel.send("after the kill", timeout=5)
        assert channel.recv(timeout=5) == "after the kill"
        assert K.registry_pid(namespace) == pid, "the registry died and another took over"
        assert all(map(os.path.exists, planted)), "the registry removed a name it does not know"
    finally:
        for path in planted:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
