"""Shared memory is unlinked when the last process lets go; `shmfeed gc` removes leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import shmfeed
from shmfeed import _gc, _release

pytestmark = pytest.mark.timeout(60)


def _hold_objects_then_wait(feed: shmfeed.Feed, channel: shmfeed.Channel, ready: shmfeed.Channel) -> None:
    mine = shmfeed.Channel()
    feed.subscribe(mine)
    ready.send(os.getpid())
    channel.recv()  # blocks (a waker exists) until killed


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
    process = mp_context.Process(target=_hold_objects_then_wait, args=(feed, channel, ready))
    process.start()
    pid = ready.recv(timeout=30)
    while channel.statistics().waiting_receivers == 0:  # asleep, so its waker exists
        pass
    os.kill(pid, signal.SIGKILL)
    process.join(30)
    # Let go of ours: the child's channel, subscription and waker stay behind.
    del feed, channel, ready
    _release.release_namespace(namespace)
    left = _gc.namespace_entries(namespace)
    assert any(".c" in entry for entry in left) and any(".w" in entry for entry in left)
    before = len(left)
    result = subprocess.run(
        [sys.executable, "-m", "shmfeed._cli", "gc", "--namespace", namespace],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"removed {before} leftover(s)" in result.stdout
    assert _gc.namespace_entries(namespace) == []


def test_gc_dry_run_lists_without_removing(namespace):
    result = subprocess.run(
        [sys.executable, "-m", "shmfeed._cli", "gc", "--namespace", namespace, "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0
    assert "would remove 0 leftover(s)" in result.stdout
