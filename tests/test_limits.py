"""Every fixed-size table in shared memory refuses loudly at its limit + 1.

Tables: attach slots (128 processes per channel, feed or scope), wait lists (64 waiting
threads per channel side, 64 watching processes per named scope), a feed's subscription
table (4,096) and a named scope's entries (1,024). The call that would overflow raises
``TableFullError`` naming the limit, and nothing is changed. Tables are filled either for
real (threads, subscriptions) or, where that takes 128 processes, with the identity of a
live process that is not ours (pid 1), and emptied again before the test ends.
"""

from __future__ import annotations

import multiprocessing
import pickle
import threading
from typing import Any

import pytest

import shmfeed
from shmfeed import _layout as L
from shmfeed import _process
from shmfeed._subscription import LocalErrorChannel
from shmfeed.testing import wait_until

WAIT = 30.0


def _fill_attach_slots(words: memoryview, init: tuple[int, int] | None = None) -> list[int]:
    """Take every free attach slot with ``init`` (default: pid 1's identity, alive, not us);
    the slots taken."""
    init = init or (1, _process.start_ticks(1) or 0)
    taken = []
    for slot in range(L.ATTACH_SLOTS):
        word = L.ATTACH_FIRST_WORD + 2 * slot
        if words[word] == 0:
            words[word], words[word + 1] = init
            words[L.ATTACHED] += 1
            taken.append(word)
    return taken


def _empty_slots(words: memoryview, taken: list[int]) -> None:
    for word in taken:
        words[word] = words[word + 1] = 0
        words[L.ATTACHED] -= 1


def _open_in_child(blob: bytes, reports: Any) -> None:
    """Unpickle a shmfeed object (attaching to it) and report what happened."""
    try:
        pickle.loads(blob)
    except shmfeed.TableFullError as error:
        reports.put(("refused", str(error)))
    except BaseException as error:  # noqa: BLE001 - reported to the test
        reports.put(("other", repr(error)))
    else:
        reports.put(("attached", ""))


def _attach_from_child(obj: Any) -> tuple[str, str]:
    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue()
    child = ctx.Process(target=_open_in_child, args=(pickle.dumps(obj), reports))
    child.start()
    try:
        return reports.get(timeout=WAIT)
    finally:
        child.join(WAIT)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["channel", "feed"])
def test_the_129th_process_is_refused(namespace: str, kind: str) -> None:
    obj: Any = shmfeed.Channel() if kind == "channel" else shmfeed.Feed("full")
    core = obj._core
    taken = _fill_attach_slots(core.words)
    try:
        assert len(L.attached_processes(core.words)) == L.ATTACH_SLOTS
        outcome, message = _attach_from_child(obj)
        assert outcome == "refused", (outcome, message)
        assert "128 processes" in message
        assert len(L.attached_processes(core.words)) == L.ATTACH_SLOTS  # nothing changed
        _empty_slots(core.words, taken[:1])
        assert _attach_from_child(obj)[0] == "attached"  # one slot free: it works again
    finally:
        _empty_slots(core.words, taken[1:])


@pytest.mark.timeout(60)
def test_a_forked_child_that_finds_no_slot_is_refused_at_first_use(namespace: str) -> None:
    channel = shmfeed.Channel()
    taken = _fill_attach_slots(channel._core.words)
    ctx = multiprocessing.get_context("fork")
    reports = ctx.Queue()
    try:
        child = ctx.Process(target=_use_inherited, args=(channel, reports))
        child.start()
        outcome = reports.get(timeout=WAIT)
        child.join(WAIT)
    finally:
        _empty_slots(channel._core.words, taken)
    assert outcome[0] == "refused" and "128 processes" in outcome[1], outcome


def _use_inherited(channel: shmfeed.Channel, reports: Any) -> None:
    try:
        channel.send(1)
    except shmfeed.TableFullError as error:
        reports.put(("refused", str(error)))
    else:
        reports.put(("used", ""))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("side", ["receivers", "senders"])
def test_the_65th_waiting_thread_is_refused(namespace: str, side: str) -> None:
    channel = shmfeed.Channel(capacity=1)
    if side == "senders":
        channel.send(0)  # full: every further send waits
    errors: list[BaseException] = []

    def wait_on_it() -> None:
        try:
            channel.recv(timeout=WAIT) if side == "receivers" else channel.send(1, timeout=WAIT)
        except BaseException as error:  # noqa: BLE001 - checked below
            errors.append(error)

    threads = [threading.Thread(target=wait_on_it) for _ in range(L.WAITLIST_SLOTS)]
    for thread in threads:
        thread.start()
    counter = "waiting_receivers" if side == "receivers" else "waiting_senders"
    try:
        wait_until(lambda: getattr(channel.statistics(), counter) == L.WAITLIST_SLOTS, 20, f"64 waiting {side}")
        with pytest.raises(shmfeed.TableFullError, match=f"64 {side} already wait"):
            channel.recv(timeout=5) if side == "receivers" else channel.send(2, timeout=5)
    finally:
        for _ in threads:  # let every waiting thread through
            channel.send(3) if side == "receivers" else channel.recv(timeout=WAIT)
        for thread in threads:
            thread.join(WAIT)
    assert errors == []


@pytest.mark.timeout(60)
def test_the_4097th_subscription_is_refused(namespace: str) -> None:
    feed = shmfeed.Feed()
    channel = shmfeed.Channel()
    sub = feed.subscribe(channel)
    core = feed._core
    table, words = core.table, core.words
    core.acquire()
    try:  # the other entries, as if 4,095 more subscriptions of a live process existed
        for entry in range(1, L.FEED_TABLE_SLOTS):
            word = entry * L.FEED_ENTRY_WORDS
            table[word], table[word + 1], table[word + 2] = 10_000 + entry, 1, 1
            table[word + 3] = L.SUB_ACTIVE_STATE | (1 << 32)
        words[L.TABLE_HIGH] = L.FEED_TABLE_SLOTS
    finally:
        core.release_lock()
    try:
        with pytest.raises(shmfeed.TableFullError, match="4096 subscriptions"):
            feed.subscribe(shmfeed.Channel())
        assert sub.statistics().active
    finally:
        core.acquire()
        try:
            for entry in range(1, L.FEED_TABLE_SLOTS):
                table[entry * L.FEED_ENTRY_WORDS + 3] = L.SUB_FREE
            words[L.TABLE_HIGH] = 1
        finally:
            core.release_lock()


class _Quiet(shmfeed.Subscription):
    """The least a user Subscription can be (SPEC: user classes may implement it)."""

    def __init__(self) -> None:
        self._err = LocalErrorChannel()

    def err(self) -> Any:
        return self._err

    def unsubscribe(self) -> None:
        pass


@pytest.mark.timeout(60)
def test_the_1025th_tracked_subscription_is_refused(namespace: str) -> None:
    scope = shmfeed.SubscriptionScope("big")
    quiet = _Quiet()
    wrappers = [scope.track(quiet) for _ in range(L.SCOPE_SLOTS)]
    assert None not in wrappers and scope.count() == L.SCOPE_SLOTS
    with pytest.raises(shmfeed.TableFullError, match="1024 subscriptions"):
        scope.track(quiet)
    assert scope.count() == L.SCOPE_SLOTS
    scope.close()


@pytest.mark.timeout(60)
def test_the_65th_watching_process_is_refused(namespace: str) -> None:
    scope = shmfeed.SubscriptionScope("watched")
    shared = scope._shared
    fake_wakers = [(1 << 32) | n for n in range(1, L.WAITLIST_SLOTS + 1)]  # pid 1: alive
    shared.acquire()
    try:
        for waker_id in fake_wakers:
            assert L.waitlist_add(shared.words, L.SCOPE_WAITLIST_WORD, L.SCOPE_WAITING, waker_id)
    finally:
        shared.release_lock()
    try:
        with pytest.raises(shmfeed.TableFullError, match="64 processes already watch"):
            scope.track(_Quiet())
        assert scope.count() == 0
    finally:
        shared.acquire()
        try:
            for waker_id in fake_wakers:
                L.waitlist_remove(shared.words, L.SCOPE_WAITLIST_WORD, L.SCOPE_WAITING, waker_id)
        finally:
            shared.release_lock()
    assert scope.track(_Quiet()) is not None
    scope.close()
