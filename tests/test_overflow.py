"""Overflow policies across processes, with a deliberately slow receiver; every drop counted."""

from __future__ import annotations

import threading
import time

import pytest

import _overflow_workers as W
import shmfeed
from shmfeed import _ring

pytestmark = pytest.mark.timeout(120)

N = 300


def _run(mp_context, overflow: str):
    feed = shmfeed.Feed()
    channel = shmfeed.Channel(capacity=8, overflow=overflow)
    sub = feed.subscribe(channel)
    ready, results = shmfeed.Channel(), shmfeed.Channel()
    receiver = mp_context.Process(target=W.slow_receiver, args=(channel, ready, results))
    receiver.start()
    ready.recv(timeout=30)
    counts = [feed.send(value) for value in range(N)]
    return feed, channel, sub, receiver, results, counts


def _finish(channel, receiver, results):
    channel.close()
    got = results.recv(timeout=60)
    receiver.join(30)
    assert receiver.exitcode == 0
    return got


def test_block_waits_for_the_slow_receiver(mp_context):
    _, channel, _, receiver, results, counts = _run(mp_context, "block")
    got = _finish(channel, receiver, results)
    assert counts == [1] * N and got == list(range(N))
    assert channel.statistics().dropped == 0


def test_drop_newest_skips_values_and_counts_them(mp_context):
    _, channel, _, receiver, results, counts = _run(mp_context, "drop_newest")
    stats = channel.statistics()
    got = _finish(channel, receiver, results)
    assert got == sorted(got) and len(set(got)) == len(got)  # in order, no duplicate
    assert sum(counts) == len(got)  # send counts only the deliveries
    assert stats.dropped == N - len(got) > 0
    assert got[0] == 0


def test_drop_oldest_discards_the_oldest_and_counts_them(mp_context):
    _, channel, _, receiver, results, counts = _run(mp_context, "drop_oldest")
    stats = channel.statistics()
    got = _finish(channel, receiver, results)
    assert got == sorted(got) and len(set(got)) == len(got)
    assert counts == [1] * N  # every value was written; older ones made room
    assert stats.dropped == N - len(got) > 0
    assert got[-8:] == list(range(N - 8, N))  # the newest values survive


def test_evict_ends_the_subscription_with_slow_subscriber_error(mp_context):
    feed, channel, sub, receiver, results, counts = _run(mp_context, "evict")
    assert isinstance(sub.err().recv(timeout=10), shmfeed.SlowSubscriberError)
    assert channel.statistics().evicted == 1
    got = _finish(channel, receiver, results)
    assert got == list(range(len(got)))  # what it got before eviction, in order
    assert sum(counts) == len(got) and counts[-1] == 0
    assert feed.send(-1) == 0


def test_resubscribe_repairs_an_eviction(mp_context):
    feed = shmfeed.Feed()
    channel = shmfeed.Channel(capacity=8, overflow="evict")
    errors = []
    subscribed = threading.Event()

    def subscribe(ctx, last_error):
        if last_error is not None:
            errors.append(last_error)
        subscription = feed.subscribe(channel)
        subscribed.set()
        return subscription

    sub = shmfeed.resubscribe_err(0.05, subscribe)
    assert subscribed.wait(10)
    ready, results = shmfeed.Channel(), shmfeed.Channel()
    receiver = mp_context.Process(target=W.slow_receiver, args=(channel, ready, results))
    receiver.start()
    ready.recv(timeout=30)
    for value in range(N):
        feed.send(value)
    assert channel.statistics().evicted >= 1
    deadline = time.monotonic() + 10
    while not errors or feed.statistics().subscriptions == 0:  # resubscribe repairs it
        assert time.monotonic() < deadline, "fn was never called again"
        time.sleep(0.01)
    while len(channel):  # let the slow receiver catch up, then send after the repair
        time.sleep(0.01)
    assert feed.send(N) == 1
    sub.unsubscribe()
    got = _finish(channel, receiver, results)
    assert errors and all(isinstance(e, shmfeed.SlowSubscriberError) for e in errors)
    assert got == sorted(got) and len(set(got)) == len(got) and got[-1] == N


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
def test_a_dropped_large_value_leaves_no_file(namespace, overflow):
    from shmfeed import _gc, _names

    channel = shmfeed.Channel(capacity=1, overflow=overflow)
    for seq in range(4):
        channel.send(bytes([seq]) * (1 << 20))  # large: each travels as a file of its own
    links = [e for e in _gc.own_entries(namespace) if e.kind is _names.EntryKind.SPILL_LINK]
    assert len(links) == 1, links  # only the value still in the ring keeps its file
    assert channel.recv(timeout=5)[0] == (0 if overflow == "drop_newest" else 3)
    channel.close()


@pytest.mark.timeout(30)
def test_a_send_counts_a_drop_before_the_ring_where_its_c_path_stopped(namespace):
    """A send that drops at a full drop_newest channel, then stops in C at a channel whose
    receiver waits (the wake is Python's), counts only the channel that took the value."""
    from shmfeed import _layout as L

    feed = shmfeed.Feed("drop-then-wake")
    lossy = shmfeed.Channel(capacity=1, overflow="drop_newest")
    waited = shmfeed.Channel(capacity=4)
    subscriptions = [feed.subscribe(lossy), feed.subscribe(waited)]  # in this order: the rings' order
    got = []
    reader = threading.Thread(target=lambda: got.append(waited.recv(timeout=20)), daemon=True)
    try:
        assert feed.send(1) == 2  # the lossy channel is full from now on
        assert waited.recv(timeout=5) == 1
        reader.start()
        deadline = time.monotonic() + 10
        while not waited._live_core().words[L.RECV_WAITING]:  # the reader sleeps on the channel
            assert time.monotonic() < deadline and reader.is_alive()
            time.sleep(0.005)
        assert feed.send(2) == 1  # dropped by the lossy channel, taken by the waited one
        reader.join(10)
        assert got == [2] and lossy.statistics().dropped == 1
    finally:
        for subscription in subscriptions:
            subscription.unsubscribe()
        lossy.close()
        waited.close()
        feed.detach()


@pytest.mark.timeout(30)
def test_a_wait_on_a_channel_subscribed_twice_stays_in_its_wait_list(namespace):
    """A value waits for room in a channel subscribed twice (two copies). The receiver takes
    one value after the first copy's offer found the channel full, and looks for waiting
    senders only later: a second offer that got in then took the first copy's registration
    out of the wait list, and nobody ever woke its sender (a send_many hung so, with the
    channel drained). A copy still waiting must stay registered."""
    from shmfeed import _codec, _ring, _waker
    from shmfeed import _layout as L
    from shmfeed._feed_core import _Waiting

    feed = shmfeed.Feed("twice")
    channel = shmfeed.Channel(capacity=1)
    subscriptions = [feed.subscribe(channel), feed.subscribe(channel)]
    try:
        channel.send(0)  # full
        core = feed._open()
        targets = core.targets()
        ring = targets[0].core
        assert len(targets) == 2 and targets[1].core is ring
        waiting = [_Waiting(target, _ring.KIND_DATA, _codec.encode(1)) for target in targets]
        waker = _waker.current_waker(namespace)
        real_offer, offers = ring.offer, []

        def offer(*args):
            outcome = real_offer(*args)
            offers.append(outcome)
            if len(offers) == 1:  # the receiver takes a value, and has not looked for senders yet
                assert outcome == _ring.FULL and ring.recv_lock.acquire_by(None)
                try:
                    assert ring._read_locked() is not None
                finally:
                    ring.recv_lock.release()
            return outcome

        ring.offer = offer
        try:
            with core.sends_held(None):
                delivered, locked = core.offer_waiting(waiting, waker, None)
        finally:
            del ring.offer
        assert locked is None and delivered + len(waiting) == 2 and waiting
        words = ring.words
        wait_list = [int(words[word]) for word in range(L.SEND_WAITLIST_WORD, L.SEND_WAITLIST_WORD + L.WAITLIST_SLOTS)]
        assert waker.waker_id in wait_list and words[L.SEND_WAITING] == 1, "the waiting copy lost its registration"
        ring.forget_sender(waker)
    finally:
        for subscription in subscriptions:
            subscription.unsubscribe()
        channel.close()
        feed.detach()


class _SaysWhenWaitedFor:
    """A channel's receive lock that says when a send starts waiting for it."""

    def __init__(self, lock, waited: threading.Event) -> None:
        self.lock, self.waited = lock, waited

    def acquire_by(self, deadline):
        self.waited.set()
        return self.lock.acquire_by(deadline)

    def release(self) -> None:
        self.lock.release()


@pytest.mark.skipif(_ring.SINGLE_LOCK, reason="one lock for both ends: a send cannot wait for a take")
def test_drop_oldest_drops_nothing_when_a_receiver_made_room_while_the_send_waited(namespace):
    """A send finds the ring full while a receiver is taking a value; by the time it holds
    the receive lock, that take has made room: nothing is dropped."""
    channel = shmfeed.Channel(capacity=2, overflow="drop_oldest")
    channel.send(0, timeout=5)
    channel.send(1, timeout=5)
    core = channel._live_core()
    lock = core.recv_lock
    assert lock.acquire_by(time.monotonic() + 5)  # a receiver in the middle of its take
    waited = threading.Event()
    core.recv_lock = _SaysWhenWaitedFor(lock, waited)
    sender = threading.Thread(target=channel.send, args=(2,), kwargs={"timeout": 5})
    sender.start()
    try:
        assert waited.wait(10)  # the send found the ring full and waits for the receive lock
        taken = core._read_locked()  # the receiver's take completes ...
    finally:
        lock.release()  # ... and lets go
        sender.join(10)
        core.recv_lock = lock
    assert taken is not None and not sender.is_alive()
    assert channel.statistics().dropped == 0
    assert [channel.recv(timeout=5), channel.recv(timeout=5)] == [1, 2]
    channel.close()
