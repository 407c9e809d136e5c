"""Every blocking call honours its timeout while another live process holds a lock it
needs (SPEC §3, last bullet), and ``Feed.send(value, timeout)`` says who got the value.

A child process takes one lock the way the library does (its pid in the lock's owner word),
says so on an Event and keeps it far longer than the parent's timeout; the parent's call
must give up within ``TIMEOUT``..``BOUND`` seconds having changed nothing, and work again
once the child let go. The converse too: a call waits for such a lock as long as its
timeout allows (the child, asleep on the lock, is seen in the semaphore's count of sleepers
before the hold is timed). Each test runs on the C hot path and on the pure-Python path (the
``data_path`` fixture), and under every start method where a child is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import multiprocessing
import os
import pickle
import re
import struct
import time
from typing import Any, Callable, Iterator

import pytest

import _kill_workers as K
import _timeout_workers as T
import shmfeed
from shmfeed import _layout as L
from shmfeed import _names, _ring
from shmfeed.testing import running, wait_until

TIMEOUT = 1.0
BOUND = 1.6  # the timeout, plus slack for a loaded 2-core box; the bug took 3.5 s
LARGE = 100_000  # travels as a spill file in these channels (a quarter of a 64 KiB ring is the limit)


def _on_path(data_path: str, channel: shmfeed.Channel) -> None:
    assert (channel._live_core()._fast is not None) == (data_path == "c")


def _label(channel: shmfeed.Channel) -> str:
    return f"{channel._channel_id:016x}"


@contextlib.contextmanager
def _holding(ctx: Any, namespace: str, obj: Any, which: str) -> Iterator[Any]:
    """A child holding ``which`` lock of ``obj`` for the duration of the block."""
    held, release, released = ctx.Event(), ctx.Event(), ctx.Event()
    with K.running(ctx, (T.hold_lock, (namespace, obj, which, held, release, released))) as (child,):
        assert held.wait(30), "the child did not take the lock"
        try:
            yield child
        finally:
            release.set()
            assert released.wait(30), "the child did not let go"


def _times_out(call: Callable[[], Any], error_type: type[BaseException] = TimeoutError) -> tuple[float, Any]:
    """Run ``call``, which must raise ``error_type``; how long it took, and the error."""
    start = time.monotonic()
    with pytest.raises(error_type) as caught:
        call()
    return time.monotonic() - start, caught.value


def _drain(channel: shmfeed.Channel) -> list[Any]:
    values = []
    while True:
        try:
            values.append(channel.recv(timeout=0))
        except TimeoutError:
            return values


def _held_by(lock: str, pid: int) -> str:
    return rf"timed out waiting for {re.escape(lock)}, held by another process \(pid {pid}\)"


# --- a channel ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_channel_send_gives_up_on_a_send_lock_another_process_holds(mp_context, namespace, data_path):
    channel = shmfeed.Channel(capacity=8)
    _on_path(data_path, channel)
    channel.send("before", timeout=5)
    with _holding(mp_context, namespace, channel, "send") as child:
        elapsed, error = _times_out(lambda: channel.send(1, timeout=TIMEOUT))
    assert TIMEOUT <= elapsed < BOUND, elapsed
    assert re.search(_held_by(f"the send lock of channel {_label(channel)}", child.pid), str(error)), error
    channel.send(2, timeout=5)
    assert _drain(channel) == ["before", 2]  # the timed-out send delivered nothing
    assert channel.statistics().waiting_senders == 0


@pytest.mark.timeout(60)
def test_channel_recv_gives_up_on_a_receive_lock_another_process_holds(mp_context, namespace, data_path):
    channel = shmfeed.Channel(capacity=8)
    _on_path(data_path, channel)
    channel.send("waiting", timeout=5)
    with _holding(mp_context, namespace, channel, "receive") as child:
        elapsed, error = _times_out(lambda: channel.recv(timeout=TIMEOUT))
    assert TIMEOUT <= elapsed < BOUND, elapsed
    assert re.search(_held_by(f"the receive lock of channel {_label(channel)}", child.pid), str(error)), error
    assert _drain(channel) == ["waiting"]  # the timed-out recv took nothing
    assert channel.statistics().waiting_receivers == 0


def _select(channel: shmfeed.Channel) -> Any:
    return shmfeed.select(channel, timeout=TIMEOUT)


def _recv_async(channel: shmfeed.Channel) -> Any:
    return asyncio.run(channel.recv_async(timeout=TIMEOUT))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("receive", [_select, _recv_async], ids=["select", "recv_async"])
def test_select_and_recv_async_give_up_on_a_receive_lock_another_process_holds(namespace, data_path, receive):
    ctx = multiprocessing.get_context("fork")  # the start methods are covered above
    channel = shmfeed.Channel(capacity=8)
    _on_path(data_path, channel)
    channel.send("waiting", timeout=5)
    with _holding(ctx, namespace, channel, "receive"):
        elapsed, _ = _times_out(lambda: receive(channel))
    assert TIMEOUT <= elapsed < BOUND, elapsed
    assert _drain(channel) == ["waiting"]


@pytest.mark.timeout(60)
def test_a_send_lock_whose_holder_was_killed_is_freed_for_a_send_without_timeout(mp_context, namespace, data_path):
    """The registry frees a dead holder's lock: ``send`` with no timeout goes on.

    Next to it: test_recovery repairs the same lock by hand, without a registry;
    test_kills scenario 3 kills a holder of a feed's send lock, and scenario 4 a channel's
    sender only if the kill happens to land mid-write.
    """
    channel = shmfeed.Channel(capacity=8)
    _on_path(data_path, channel)
    K.registry_pid(namespace)
    held = mp_context.Event()
    with K.running(mp_context, (T.hold_lock_until_killed, (namespace, channel, "send", held))) as (child,):
        assert held.wait(30), "the child did not take the lock"
        K.wait_watched(namespace, child.pid)
        killed_at = K.kill(child.pid)
        sender = K.SenderThread(channel.send, ["after"])
        sender.start()
        sender.finish(10)
    assert sender.times[0] - killed_at < K.PROCEED_BOUND
    assert _drain(channel) == ["after"]


# --- a feed ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_feed_send_gives_up_on_a_feed_send_lock_another_process_holds(mp_context, namespace, data_path):
    feed = shmfeed.Feed("prices")
    channel = shmfeed.Channel(capacity=8)
    _on_path(data_path, channel)
    sub = feed.subscribe(channel)
    assert feed.send("before") == 1
    with _holding(mp_context, namespace, feed, "feed send") as child:
        elapsed, error = _times_out(lambda: feed.send("late", timeout=TIMEOUT), shmfeed.FeedSendTimeout)
    assert TIMEOUT <= elapsed < BOUND, elapsed
    assert isinstance(error, TimeoutError) and isinstance(error, shmfeed.ShmfeedError)
    assert error.delivered == 0 and error.pending == (_label(channel),)
    assert re.search(_held_by("the send lock of feed 'prices'", child.pid), str(error)), error
    assert str(error).startswith("shmfeed: feed 'prices' send timed out after 1.0 s: delivered to 0 channels")
    assert feed.send("after", timeout=5) == 1
    assert _drain(channel) == ["before", "after"]
    assert (feed.statistics().sent, feed.statistics().delivered) == (2, 2)
    sub.unsubscribe()


def _spill_files(namespace: str, channel: shmfeed.Channel) -> list[str]:
    return glob.glob(_names.spill_file(namespace, channel._channel_id, 0)[:-16] + "*")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", ["inline", "spill"])
def test_feed_send_timing_out_on_a_full_channel_says_who_got_the_value(namespace, data_path, size):
    old, new = ("old", "new") if size == "inline" else (b"o" * LARGE, b"n" * LARGE)
    feed = shmfeed.Feed("prices")
    roomy, full = shmfeed.Channel(capacity=8), shmfeed.Channel(capacity=1)
    _on_path(data_path, full)
    subs = [feed.subscribe(roomy), feed.subscribe(full)]
    full.send(old, timeout=5)  # full now, and nobody reads it
    files_before = _spill_files(namespace, full)  # the old value's, if large
    elapsed, error = _times_out(lambda: feed.send(new, timeout=TIMEOUT), shmfeed.FeedSendTimeout)
    assert TIMEOUT <= elapsed < BOUND, elapsed
    assert error.delivered == 1 and error.pending == (_label(full),)
    assert str(error) == (
        f"shmfeed: feed 'prices' send timed out after 1.0 s: delivered to 1 channel, not to {_label(full)} (full); "
        f"send it again to reach those (the others get it twice), or give a longer timeout"
    )
    again = pickle.loads(pickle.dumps(error))  # e.g. a Pool task's error, back in the parent
    assert (type(again), str(again), again.delivered, again.pending) == (type(error), str(error), 1, error.pending)
    assert full.statistics().waiting_senders == 0  # no waker left in its wait list
    assert _spill_files(namespace, full) == files_before  # its copy of a large value was withdrawn
    assert _drain(roomy) == [new]  # exactly once
    assert _drain(full) == [old]  # and nothing stray after it
    assert (feed.statistics().sent, feed.statistics().delivered) == (1, 1)
    assert feed.send(new, timeout=5) == 2  # room again: a send goes through
    assert _drain(roomy) == [new] and _drain(full) == [new]
    for sub in subs:
        sub.unsubscribe()


# --- and waits as long as it may ----------------------------------------------------------------


def _sleepers(lock: Any) -> int:
    """How many threads, in any process, sleep in ``sem_wait`` on this named semaphore:
    glibc keeps the count in the upper half of the semaphore's first 64-bit word."""
    with open("/dev/shm/sem." + lock.name.lstrip("/"), "rb") as semaphore:
        return int(struct.unpack("<Q", semaphore.read(8))[0] >> 32)


@pytest.mark.timeout(60)
def test_a_channel_opened_in_another_process_waits_for_a_busy_lock(namespace, data_path, monkeypatch):
    """A channel unpickled in a spawn child takes its locks the ordinary way: its ``recv``
    waits for a receive lock another process holds for as long as its timeout allows. (It
    once opened them bounded, as recovery does, and gave up after 0.2 s with LockBusy.)"""
    if data_path == "python":
        monkeypatch.setenv("SHMFEED_PURE_PYTHON", "1")  # for the child, as the fixture did here
    channel = shmfeed.Channel(capacity=4)
    channel.send("v")
    core = channel._live_core()
    lock, words = core.recv_lock, core.words
    hold = 5 * _ring.RECOVERY_LOCK_TIMEOUT  # far past where a bounded lock gives up
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    lock.acquire()  # taken as the library takes it: with its owner's pid
    words[L.RECV_LOCK_OWNER] = os.getpid()
    try:
        with running(ctx, (T.recv_once, (namespace, channel, writer))) as (child,):
            # Hand-shake: the child is about to call, then asleep on the lock (not merely
            # started) before the hold is timed; a child that gave up says so on the pipe.
            assert reader.poll(30) and reader.recv() == ("calling", child.pid)
            wait_until(lambda: _sleepers(lock) == 1 or reader.poll(0), 30, "the child asleep on the receive lock")
            assert not reader.poll(hold), f"the child stopped waiting for the lock: {reader.recv()}"
            assert _sleepers(lock) == 1
            words[L.RECV_LOCK_OWNER] = 0
            lock.release()
            lock = None
            assert reader.poll(20), "the child did not take the lock once free"
            assert reader.recv() == ("ok", "v")
            child.join(20)
    finally:
        if lock is not None:
            words[L.RECV_LOCK_OWNER] = 0
            lock.release()
    channel.close()
