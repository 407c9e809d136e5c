"""Shared memory is unlinked when the last process lets go; `shmfeed gc` removes leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import shmfeed
from shmfeed import _gc, _names, _registry_client, _release
from shmfeed.testing import wait_until

pytestmark = pytest.mark.timeout(60)


def _hold_objects_then_wait(feed: shmfeed.Feed, channel: shmfeed.Channel, ready: shmfeed.Channel) -> None:
    mine = shmfeed.Channel()
    feed.subscribe(mine)
    ready.send(os.getpid())
    channel.recv()  # blocks (a waker exists) until killed


def _wait_on(channel: shmfeed.Channel, ready: shmfeed.Channel) -> None:
    ready.send(os.getpid())
    channel.recv()  # blocks (a waker exists) until killed


def _channels_and_wakers(namespace: str, entries: list[str]) -> tuple[list[str], list[str]]:
    """The channel segments and the wakers among a namespace's entries in /dev/shm."""
    kinds = {entry: getattr(_names.parse_entry(namespace, entry), "kind", None) for entry in entries}
    return ([entry for entry, kind in kinds.items() if kind is _names.EntryKind.CHANNEL],
            [entry for entry, kind in kinds.items() if kind is _names.EntryKind.WAKER])


def _kill_while_asleep(mp_context, target, args: tuple, channel: shmfeed.Channel, ready: shmfeed.Channel) -> None:
    """Start ``target`` in a child, wait until it sleeps on ``channel`` (so its waker exists),
    then SIGKILL it."""
    process = mp_context.Process(target=target, args=args)
    process.start()
    pid = ready.recv(timeout=30)
    wait_until(lambda: channel.statistics().waiting_receivers, 30, "the child asleep on the channel")
    os.kill(pid, signal.SIGKILL)
    process.join(30)


def test_objects_are_unlinked_when_the_last_process_lets_go(namespace, mp_context):
    channel = shmfeed.Channel()
    process = mp_context.Process(target=channel.send, args=("from child",))
    process.start()
    process.join(30)
    assert process.exitcode == 0
    assert channel.recv(timeout=5) == "from child"
    assert _gc.namespace_entries(namespace)  # still ours
    del channel
    _release.release_namespace(namespace)
    assert _gc.namespace_entries(namespace) == []


def test_gc_removes_what_a_killed_process_left(namespace, mp_context, monkeypatch):
    monkeypatch.setenv("SHMFEED_NO_REGISTRY", "1")  # else the registry cleans up first
    feed, channel, ready = shmfeed.Feed("left"), shmfeed.Channel(), shmfeed.Channel()
    _kill_while_asleep(mp_context, _hold_objects_then_wait, (feed, channel, ready), channel, ready)
    # Let go of ours: the child's channel, subscription and waker stay behind.
    del feed, channel, ready
    _release.release_namespace(namespace)
    left = _gc.namespace_entries(namespace)
    channels, wakers = _channels_and_wakers(namespace, left)
    assert channels and wakers, left
    before = len(left)
    result = subprocess.run(
        [sys.executable, "-m", "shmfeed._cli", "gc", "--namespace", namespace],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"removed {before} leftover(s)" in result.stdout
    assert _gc.namespace_entries(namespace) == []


def test_the_registry_removes_a_dead_process_waker_that_no_segment_names(namespace, mp_context, monkeypatch):
    # The child's only trace once the channel is gone is its waker (a sleeper's semaphore,
    # its pid in the name): the registry must find it by that name, or it stays for good
    # and the registry, never seeing the namespace empty, never leaves.
    monkeypatch.setenv("SHMFEED_NO_REGISTRY", "1")  # no registry yet: nothing cleans up early
    channel, ready = shmfeed.Channel(), shmfeed.Channel()
    _kill_while_asleep(mp_context, _wait_on, (channel, ready), channel, ready)
    del channel, ready  # the last live process lets go: the segments go, the waker stays
    _release.release_namespace(namespace)
    left = _gc.namespace_entries(namespace)
    channels, wakers = _channels_and_wakers(namespace, left)
    assert wakers and not channels, left
    monkeypatch.delenv("SHMFEED_NO_REGISTRY")
    _registry_client.ensure_running(namespace)
    wait_until(lambda: not _gc.namespace_entries(namespace), 15, "the registry removing the dead waker")
    # ... and, the namespace empty, it leaves.
    wait_until(lambda: not _registry_client.is_running(namespace), 15, "the registry leaving")


def test_gc_dry_run_lists_without_removing(namespace):
    result = subprocess.run(
        [sys.executable, "-m", "shmfeed._cli", "gc", "--namespace", namespace, "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0
    assert "would remove 0 leftover(s)" in result.stdout


def test_gc_removes_a_semaphore_temp_file_a_killed_sem_open_left(namespace):
    # glibc's sem_open makes /dev/shm/sem.XXXXXX, links it under the name, then removes
    # it: a process killed in between (the soak's chaos did) leaves the temporary file.
    old, fresh = "/dev/shm/sem.Zz0Qa1", "/dev/shm/sem.Zz0Qa2"
    for path in (old, fresh):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    past = time.time() - _gc.LOCK_GRACE_SECONDS - 5
    os.utime(old, (past, past))
    try:
        assert old in _gc.sweep(namespace, remove=False).all()
        assert fresh not in _gc.sweep(namespace).all()  # a sem_open may be in progress
        assert not os.path.exists(old) and os.path.exists(fresh)
    finally:
        for path in (old, fresh):
            if os.path.exists(path):
                os.unlink(path)
