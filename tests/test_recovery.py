"""Recovery after deaths, driven directly (no registry) so that each step can be checked."""

from __future__ import annotations

import os
import signal
import time

import pytest

import _kill_workers as K
import _scope_workers
import shmfeed
from shmfeed import _layout as L
from shmfeed import _inspect, _recovery

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def no_registry(monkeypatch):
    monkeypatch.setenv("SHMFEED_NO_REGISTRY", "1")


def _kill(process, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    process.join(10)


def _kill_while_holding(mp_context, target, args: tuple) -> None:
    """Run ``target(*args, ready)`` in a child until it says on the pipe that it holds a lock; kill it."""
    reader, writer = mp_context.Pipe(duplex=False)
    process = mp_context.Process(target=target, args=(*args, writer))
    process.start()
    assert reader.poll(30), "the child never took the lock"
    _kill(process, reader.recv())


def _passes_until_released(namespace: str, lock) -> int:
    """Recovery passes (the registry's, one after the other) until ``lock`` is free again."""
    assert lock.value == 0
    suspects: dict = {}
    passes = 0
    while lock.value == 0:
        passes += 1
        assert passes <= _recovery.SUSPECT_CHECKS + 1, "the lock was never released"
        _recovery.recover_namespace(namespace, _recovery.Liveness(suspects))
    return passes


@pytest.mark.parametrize("which", ["owner", "no owner"])
def test_a_lock_of_a_killed_process_is_released(mp_context, namespace, which):
    channel = shmfeed.Channel(capacity=4)
    _kill_while_holding(mp_context, K.hold_channel_lock, (namespace, channel, which == "owner"))
    passes = _passes_until_released(namespace, channel._core.send_lock)
    assert passes == (1 if which == "owner" else _recovery.SUSPECT_CHECKS)
    channel.send("works again", timeout=5)
    assert channel.recv(timeout=5) == "works again"


@pytest.mark.parametrize("which", ["owner", "no owner"])
def test_a_scope_lock_of_a_killed_process_is_released_as_a_channel_lock_is(mp_context, namespace, which):
    # The same steps as for a channel: a dead owner's lock at once, an ownerless one after
    # SUSPECT_CHECKS passes; the dead process's entry goes in the pass that frees the lock.
    scope = shmfeed.SubscriptionScope("job")
    _kill_while_holding(mp_context, _scope_workers.hold_scope_lock, (namespace, "job", which == "owner"))
    assert scope.count() == 1  # the child's tracked subscription
    passes = _passes_until_released(namespace, scope._shared.segment_lock)
    assert passes == (1 if which == "owner" else _recovery.SUSPECT_CHECKS)
    assert scope.count() == 0
    sub = scope.track(shmfeed.Feed().subscribe(shmfeed.Channel()))
    assert sub is not None and scope.count() == 1
    scope.close()
    assert scope.count() == 0 and sub.err().recv(timeout=5) is None


def _subscribe_and_hang(feed: shmfeed.Feed, results: shmfeed.Channel) -> None:
    channel = shmfeed.Channel(capacity=1)
    feed.subscribe(channel)
    results.send(os.getpid())
    signal.pause()


def test_a_killed_subscriber_releases_a_blocked_send(mp_context, namespace):
    import threading

    feed, results, mine = shmfeed.Feed("k"), shmfeed.Channel(), shmfeed.Channel()
    feed.subscribe(mine)
    process = mp_context.Process(target=_subscribe_and_hang, args=(feed, results))
    process.start()
    pid = results.recv(timeout=30)
    assert feed.send(1) == 2  # fills the child's channel
    counts: list[int] = []
    sender = threading.Thread(target=lambda: counts.append(feed.send(2)))
    sender.start()
    deadline = time.monotonic() + 10
    while not any(c["waiting_senders"] for c in _inspect.snapshot(namespace)["channels"]):
        assert time.monotonic() < deadline
    _kill(process, pid)
    repairs = _recovery.recover_namespace(namespace)
    sender.join(10)
    assert counts == [1] and repairs.ended_subscriptions == 1
    assert [mine.recv(0), mine.recv(0)] == [1, 2]
    assert feed.statistics().subscriptions == 1


def _send_once(feed: shmfeed.Feed, results: shmfeed.Channel) -> None:
    feed.send("hello")
    results.send(os.getpid())
    signal.pause()


def test_subscribers_learn_that_every_sender_died(mp_context, namespace):
    feed, results, channel = shmfeed.Feed("k"), shmfeed.Channel(), shmfeed.Channel()
    sub = feed.subscribe(channel)
    process = mp_context.Process(target=_send_once, args=(feed, results))
    process.start()
    pid = results.recv(timeout=30)
    assert channel.recv(timeout=5) == "hello"
    _kill(process, pid)
    repairs = _recovery.recover_namespace(namespace)
    assert repairs.failed_subscriptions == 1
    assert isinstance(sub.err().recv(timeout=5), shmfeed.SenderDiedError)
    assert sub.err().recv(timeout=5) is None


def test_recount_after_a_dead_writer(namespace):
    channel = shmfeed.Channel(capacity=8)
    channel.send(1)
    core = channel._core
    core.words[L.SENT] += 1  # as if a writer died between its two counter updates
    core.acquire()
    core.words[L.LOCK_OWNER] = 2**22 + 12345  # a pid that cannot exist
    _recovery.recover_namespace(namespace)
    assert core.words[L.SENT] - core.words[L.RECEIVED] == 1 == len(channel)
    assert channel.recv(0) == 1
