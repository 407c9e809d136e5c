"""Recovery after deaths, driven directly (no registry) so that each step can be checked."""

from __future__ import annotations

import os
import signal
import time

import pytest

import shmfeed
from shmfeed import _layout as L
from shmfeed import _inspect, _recovery

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def no_registry(monkeypatch):
    monkeypatch.setenv("SHMFEED_NO_REGISTRY", "1")


def _take_lock_and_hang(channel: shmfeed.Channel, which: str, results: shmfeed.Channel) -> None:
    core = channel._core
    if which == "owner":
        core.acquire()  # the owner word says who holds it
    else:
        core.send_lock.acquire()  # killed before writing the owner word
    results.send(os.getpid())
    signal.pause()


def _kill(process, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    process.join(10)


@pytest.mark.parametrize("which", ["owner", "no owner"])
def test_a_lock_of_a_killed_process_is_released(mp_context, namespace, which):
    channel, results = shmfeed.Channel(capacity=4), shmfeed.Channel()
    process = mp_context.Process(target=_take_lock_and_hang, args=(channel, which, results))
    process.start()
    pid = results.recv(timeout=30)
    _kill(process, pid)
    assert channel._core.send_lock.value == 0
    suspects: dict = {}
    passes = 0
    while channel._core.send_lock.value == 0:
        passes += 1
        assert passes <= _recovery.SUSPECT_CHECKS + 1, "the lock was never released"
        _recovery.recover_namespace(namespace, _recovery.Liveness(suspects))
    assert passes == (1 if which == "owner" else _recovery.SUSPECT_CHECKS)
    channel.send("works again", timeout=5)
    assert channel.recv(timeout=5) == "works again"


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
