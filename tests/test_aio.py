"""asyncio on both sides, and the nowait calls: ``Channel.send_async``, ``Feed.send_async``,
``select_async``, ``err().recv_async``, ``send_nowait`` / ``recv_nowait``.

The cancellation tests cancel at many random points (``asyncio.wait_for`` with tiny
timeouts, in a loop) against a process on the other side, then check that every value
arrived exactly once, in order.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from typing import Any

import pytest

import _aio_workers as A
import shmfeed
from _kill_workers import wait_until

pytestmark = pytest.mark.timeout(60)

N = 400
STOP = -1
TINY = (0.0, 0.0001, 0.0003, 0.001)  # wait_for timeouts: cancel before, during and after


def _start(mp_context: Any, target: Any, *args: Any) -> Any:
    process = mp_context.Process(target=target, args=args)
    process.start()
    return process


def _result(results: shmfeed.Channel, kind: str) -> Any:
    message = results.recv(timeout=30)
    assert message[0] != "error", message[2]
    assert message[0] == kind, message
    return message[1]


def _join(process: Any) -> None:
    process.join(30)
    assert process.exitcode == 0


# --- nowait ------------------------------------------------------------------------------------


def test_send_nowait_and_recv_nowait_raise_the_queue_errors():
    with shmfeed.Channel(capacity=2) as channel:
        channel.send_nowait("a")
        channel.send_nowait("b")
        with pytest.raises(queue.Full, match="is full"):  # what a multiprocessing.Queue user catches
            channel.send_nowait("c")
        with pytest.raises(shmfeed.ChannelFull):
            channel.send_nowait("c")
        assert [channel.recv_nowait(), channel.recv_nowait()] == ["a", "b"]
        with pytest.raises(queue.Empty, match="is empty"):
            channel.recv_nowait()
        with pytest.raises(shmfeed.ChannelEmpty):
            channel.recv_nowait()
        assert channel.statistics().sent == 2 and channel.statistics().received == 2
        channel.send_nowait(b"x" * 100_000)  # a large value travels as a file: the same rules
        channel.send_nowait(b"y" * 100_000)
        with pytest.raises(shmfeed.ChannelFull):
            channel.send_nowait(b"z" * 100_000)
        assert channel.recv_nowait() == b"x" * 100_000 and channel.recv_nowait() == b"y" * 100_000
        channel.close()
        with pytest.raises(shmfeed.ChannelClosed):
            channel.send_nowait("late")
        with pytest.raises(shmfeed.ChannelClosed):
            channel.recv_nowait()


def test_send_nowait_follows_the_overflow_policy():
    with shmfeed.Channel(capacity=1, overflow="drop_oldest") as oldest, \
            shmfeed.Channel(capacity=1, overflow="drop_newest") as newest:
        for value in (1, 2):
            oldest.send_nowait(value)
            newest.send_nowait(value)
        assert oldest.recv_nowait() == 2 and newest.recv_nowait() == 1
        assert oldest.statistics().dropped == 1 and newest.statistics().dropped == 1


# --- Channel.send_async / recv_async ----------------------------------------------------------


@pytest.mark.parametrize("mp_context", ["fork", "spawn"], indirect=True)
def test_cancelled_send_async_sends_each_value_once_in_order(namespace, mp_context):
    """A slow reader in another process; the sender's every send_async is cut short at a
    random point and retried until it went through: the reader sees 0..N-1 once each."""
    with shmfeed.Channel(capacity=4) as channel, shmfeed.Channel(capacity=4) as results:
        reader = _start(mp_context, A.slow_reader, namespace, results, channel, STOP)

        async def main() -> int:
            cancelled = 0
            for value in range(N):
                while True:
                    try:
                        await asyncio.wait_for(channel.send_async(value), random.choice(TINY))
                        break
                    except asyncio.TimeoutError:
                        cancelled += 1
            await channel.send_async(STOP, timeout=30)
            return cancelled

        cancelled = asyncio.run(main())
        got = _result(results, "got")
        _join(reader)
    assert cancelled > 10  # the cancellations did land (mostly while the ring was full)
    assert got == list(range(N))


@pytest.mark.parametrize("mp_context", ["fork", "spawn"], indirect=True)
def test_cancelled_recv_async_and_select_async_lose_nothing(namespace, mp_context):
    """A producer process fills two channels; the receiver's every recv_async and
    select_async is cut short at a random point: each channel's values arrive once, in order."""
    with shmfeed.Channel(capacity=4) as one, shmfeed.Channel(capacity=4) as two, \
            shmfeed.Channel(capacity=4) as results:
        producer = _start(mp_context, A.producer, namespace, results, [one, two], N)

        async def main() -> tuple[dict[str, list[int]], int]:
            got: dict[str, list[int]] = {"one": [], "two": []}
            cancelled = 0
            while len(got["one"]) + len(got["two"]) < 2 * N:
                if not (one.statistics().fill or two.statistics().fill or producer.is_alive()):
                    break  # all sent and all taken: what is missing was lost
                try:
                    if random.random() < 0.3:
                        got["one"].append(await asyncio.wait_for(one.recv_async(), random.choice(TINY)))
                    else:
                        which, value = await asyncio.wait_for(shmfeed.select_async(one, two), random.choice(TINY))
                        got["one" if which is one else "two"].append(value)
                except asyncio.TimeoutError:
                    cancelled += 1
            return got, cancelled

        got, cancelled = asyncio.run(main())
        assert _result(results, "sent") == N
        _join(producer)
    assert cancelled > 10
    assert got == {"one": list(range(N)), "two": list(range(N))}


def test_a_waiter_that_leaves_does_not_strand_another_on_the_same_channel():
    """All coroutines of a process share one waker: one that times out (or takes the value)
    must not take the waker out of the wait list under another that still waits."""
    with shmfeed.Channel(capacity=4) as channel, shmfeed.Channel(capacity=1) as full:
        full.send(0)

        async def main() -> tuple[Any, Any]:
            staying = asyncio.create_task(channel.recv_async(timeout=10))
            leaving = asyncio.create_task(channel.recv_async(timeout=0.05))
            staying_sender = asyncio.create_task(full.send_async(1, timeout=10))
            leaving_sender = asyncio.create_task(full.send_async(2, timeout=0.05))
            for task in (leaving, leaving_sender):
                with pytest.raises(TimeoutError):
                    await task
            # Both left after registering; now the other side moves, from another thread
            # (a send or a receive from any process wakes through the wait list alone).
            threading.Thread(target=lambda: (channel.send("hello"), full.recv())).start()
            return await staying, await staying_sender

        started = time.monotonic()
        assert asyncio.run(main()) == ("hello", None)
        assert time.monotonic() - started < 5  # woken, not rescued by its own timeout
        assert full.recv(timeout=5) == 1


# --- Feed.send_async --------------------------------------------------------------------------


@pytest.mark.parametrize("mp_context", ["fork", "spawn"], indirect=True)
def test_cancelled_feed_send_async_delivers_to_all_or_none_in_order(namespace, mp_context):
    """Two slow subscribers in other processes. Each send_async is cut short at a random
    point and never retried: a cancel before any delivery sends nothing, one after some
    delivery completes it. So both subscribers see the same values, once, in order, and
    every send that returned is among them."""
    feed = shmfeed.Feed("prices")
    with shmfeed.Channel(capacity=2) as first, shmfeed.Channel(capacity=2) as second, \
            shmfeed.Channel(capacity=4) as results:
        subs = [feed.subscribe(first), feed.subscribe(second)]
        readers = [_start(mp_context, A.slow_reader, namespace, results, channel, STOP) for channel in (first, second)]

        async def main() -> tuple[list[int], int]:
            returned, cancelled = [], 0
            for value in range(N):
                try:
                    assert await asyncio.wait_for(feed.send_async(value), random.choice(TINY)) == 2
                    returned.append(value)
                except asyncio.TimeoutError:
                    cancelled += 1
            assert await feed.send_async(STOP, timeout=30) == 2
            return returned, cancelled

        returned, cancelled = asyncio.run(main())
        got = [_result(results, "got"), _result(results, "got")]
        for reader in readers:
            _join(reader)
        for sub in subs:
            sub.unsubscribe()
    assert cancelled > 10 and len(returned) > 10  # both kinds of outcome happened
    assert got[0] == got[1]  # all or none: never only some subscribers
    assert got[0] == sorted(set(got[0]))  # in order, once each
    assert set(returned) <= set(got[0])
    statistics = feed.statistics()
    assert statistics.sent == len(got[0]) + 1 and statistics.delivered == 2 * statistics.sent


@pytest.mark.parametrize("mp_context", ["fork", "spawn"], indirect=True)
def test_feed_send_async_waits_for_a_busy_send_lock_without_blocking_the_loop(namespace, mp_context):
    """Another process's send holds the feed's send lock while it waits on a full channel:
    send_async waits for that lock off the event loop, and comes after it in order."""
    feed = shmfeed.Feed("ticks")
    with shmfeed.Channel(capacity=1) as channel, shmfeed.Channel(capacity=4) as results:
        sub = feed.subscribe(channel)
        feed.send(0)  # the channel is now full
        sender = _start(mp_context, A.blocked_feed_sender, namespace, results, "ticks", 1)
        wait_until(lambda: channel.statistics().waiting_senders == 1, 30, "the other send waits")

        async def main() -> tuple[float, list[int], int]:
            sending = asyncio.create_task(feed.send_async(2, timeout=20))
            longest = await _ticks_while_for(sending, 0.2)  # the loop runs while it waits
            assert not sending.done()
            got = [await channel.recv_async(timeout=10) for _ in range(3)]
            count = await sending
            return longest, got, count

        longest, got, count = asyncio.run(main())
        assert _result(results, "sent") == 1
        _join(sender)
        sub.unsubscribe()
    assert longest < 0.1, f"the event loop was blocked for {longest:.3f} s"
    assert got == [0, 1, 2] and count == 1


async def _ticks_while_for(task: "asyncio.Task[Any]", seconds: float) -> float:
    """The longest the event loop was away during ``seconds`` (or until ``task`` ends)."""
    end = time.monotonic() + seconds
    longest, last = 0.0, time.monotonic()
    while not task.done() and time.monotonic() < end:
        await asyncio.sleep(0.001)
        now = time.monotonic()
        longest, last = max(longest, now - last), now
    return longest


def test_feed_send_async_keeps_the_send_rules():
    """Lossless (it waits for a full subscriber without blocking the loop), and timeout
    (FeedSendTimeout saying who got the value) as Feed.send."""
    feed = shmfeed.Feed()
    with shmfeed.Channel(capacity=1) as small, shmfeed.Channel(capacity=8) as big:
        subs = [feed.subscribe(small), feed.subscribe(big)]

        async def main() -> None:
            assert await feed.send_async("a") == 2
            sending = asyncio.create_task(feed.send_async("b"))
            assert await _ticks_while_for(sending, 0.1) < 0.1 and not sending.done()
            assert await small.recv_async() == "a"
            assert await sending == 2
            with pytest.raises(shmfeed.FeedSendTimeout) as timed_out:
                await feed.send_async("c", timeout=0.05)
            assert timed_out.value.delivered == 1 and len(timed_out.value.pending) == 1
            assert [big.recv_nowait() for _ in range(3)] == ["a", "b", "c"]
            assert small.recv_nowait() == "b" and len(small) == 0
            with pytest.raises(shmfeed.FeedTypeError):
                await feed.send_async(1)

        asyncio.run(main())
        for sub in subs:
            sub.unsubscribe()


# --- err().recv_async ---------------------------------------------------------------------------


@pytest.mark.parametrize("mp_context", ["fork", "spawn"], indirect=True)
def test_err_recv_async_hears_a_feed_closed_in_another_process(namespace, mp_context):
    feed = shmfeed.Feed("jobs")
    with shmfeed.Channel() as channel, shmfeed.Channel(capacity=4) as results:
        sub = feed.subscribe(channel)

        async def main() -> Any:
            with pytest.raises(TimeoutError):
                await sub.err().recv_async(timeout=0.01)
            waiting = asyncio.create_task(sub.err().recv_async(timeout=30))
            await asyncio.sleep(0)
            closer = _start(mp_context, A.close_feed, namespace, results, "jobs")
            try:
                return await waiting
            finally:
                _result(results, "closed")
                _join(closer)

        assert asyncio.run(main()) is None


def test_err_recv_async_of_a_local_subscription_gets_its_error_after_a_cancel():
    failed = threading.Event()

    def producer(quit: threading.Event) -> None:
        failed.wait(10)
        raise ValueError("boom")

    sub = shmfeed.new_subscription(producer)

    async def main() -> BaseException | None:
        waiting = asyncio.create_task(sub.err().recv_async())
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        failed.set()
        return await sub.err().recv_async(timeout=10)

    error = asyncio.run(main())
    assert isinstance(error, ValueError) and str(error) == "boom"
    sub.unsubscribe()
