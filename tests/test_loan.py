"""``Feed.loan``: a ``bytes`` value written in place in shared memory and sent without a
copy; what receivers get, what the buffer allows, and that nothing is lost or leaked."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

import _loan_workers as LW
import shmfeed
from shmfeed import _gc, _names, _native, _spill
from shmfeed import _layout as L
from shmfeed.testing import wait_until

pytestmark = pytest.mark.timeout(90)
needs_accel = pytest.mark.skipif(_native.accel is None,
                                 reason="counting what was made from the buffer needs the C accelerator")
MIB = 1 << 20
SIZES = [1, 200, 70_000, MIB, 3 * MIB + 17]  # inline in both channels, inline in one, spilled


Subscribed = tuple[shmfeed.Feed[bytes], shmfeed.Channel[bytes]]


@pytest.fixture
def subscribed(request: pytest.FixtureRequest, namespace: str) -> Iterator[Subscribed]:
    """A feed and one channel subscribed to it (capacity 4, or the test's parameter), closed
    after the test."""
    feed: shmfeed.Feed[bytes] = shmfeed.Feed()
    channel = shmfeed.Channel[bytes](getattr(request, "param", 4))
    subscription = feed.subscribe(channel)
    yield feed, channel
    subscription.unsubscribe()
    channel.close()
    feed.close()


def _pool_files(namespace: str, pid: int | None = None) -> list[str]:
    return [entry.file for entry in _gc.own_entries(namespace)
            if entry.kind is _names.EntryKind.SPILL_TEMP and (pid is None or entry.pid == pid)]


def test_loaned_values_reach_channels_in_other_processes_as_bytes(
    mp_context: multiprocessing.context.BaseContext, namespace: str
) -> None:
    feed: shmfeed.Feed[bytes] = shmfeed.Feed()
    channels = [shmfeed.Channel[bytes](4), shmfeed.Channel[bytes](4, buffer_size=8 * MIB)]
    subs = [feed.subscribe(channel) for channel in channels]
    results = mp_context.Queue()
    readers = [mp_context.Process(target=LW.receive_digests, args=(channel, len(SIZES), results))
               for channel in channels]
    for reader in readers:
        reader.start()
    try:
        assert LW.loan_and_send(feed, SIZES, seed=7) == [2] * len(SIZES)
        expected = [("bytes", size, LW.digest(LW.pattern(size, 7 + index))) for index, size in enumerate(SIZES)]
        assert [results.get(timeout=60) for _ in readers] == [expected, expected]
    finally:
        for reader in readers:
            reader.join(30)
        for sub in subs:
            sub.unsubscribe()
        for channel in channels:
            channel.close()
        feed.close()
    assert all(reader.exitcode == 0 for reader in readers)


@pytest.mark.parametrize("subscribed", [8], indirect=True)  # capacity
def test_pool_workers_loan_send_and_return(
    mp_context: multiprocessing.context.BaseContext, subscribed: Subscribed
) -> None:
    feed, channel = subscribed
    jobs = [([MIB, 100, 2 * MIB], 10 * worker) for worker in range(4)]
    with mp_context.Pool(2) as pool:
        pending = pool.starmap_async(LW.loan_and_send, [(feed, sizes, seed) for sizes, seed in jobs])
        got = [channel.recv(timeout=30) for _ in range(12)]
        assert pending.get(timeout=60) == [[1, 1, 1]] * 4
    wanted = sorted(LW.digest(LW.pattern(size, seed + index)) for sizes, seed in jobs
                    for index, size in enumerate(sizes))
    assert sorted(LW.digest(value) for value in got) == wanted
    assert all(type(value) is bytes for value in got)


@needs_accel
def test_a_loaned_value_received_as_a_view_is_the_buffer_written(subscribed: Subscribed) -> None:
    feed, channel = subscribed
    with feed.loan(2 * MIB) as loan:
        array = np.frombuffer(loan.buffer, dtype=np.uint32)
        array[:] = np.arange(array.size, dtype=np.uint32)
        del array
        assert loan.send() == 1
    view = channel.recv_view(timeout=5)
    assert isinstance(view, memoryview) and view.readonly
    assert np.array_equal(np.frombuffer(view, dtype=np.uint32), np.arange(MIB // 2, dtype=np.uint32))
    view.release()


@needs_accel
def test_a_live_slice_or_array_of_the_buffer_holds_the_send_back(subscribed: Subscribed) -> None:
    feed, channel = subscribed
    loan = feed.loan(MIB)
    loan.buffer[:] = b"a" * MIB
    tail = loan.buffer[-10:]
    with pytest.raises(BufferError, match="still alive"):
        loan.send()
    assert len(channel) == 0  # nothing went
    array = np.frombuffer(loan.buffer, dtype=np.uint8)
    del tail
    with pytest.raises(BufferError, match="still alive"):
        loan.send()
    array[-1] = ord("z")
    del array
    gc.collect()
    assert loan.send() == 1
    assert channel.recv(timeout=5) == b"a" * (MIB - 1) + b"z"


def test_a_loan_is_sent_once_and_its_buffer_dies_with_the_send(subscribed: Subscribed) -> None:
    feed, channel = subscribed
    loan = feed.loan(MIB)
    kept = loan.buffer
    kept[:3] = b"abc"
    assert loan.send() == 1
    with pytest.raises(ValueError, match="released"):
        kept[0] = 1  # the buffer a user kept cannot write into the value in flight
    with pytest.raises(ValueError, match="sent or discarded"):
        loan.buffer
    with pytest.raises(ValueError, match="sent or discarded"):
        loan.send()
    assert channel.recv(timeout=5)[:3] == b"abc"
    assert "ended" in repr(loan) and loan.size == MIB


def test_a_loan_left_unsent_delivers_nothing_and_its_file_goes_back_to_the_pool(
    subscribed: Subscribed, namespace: str
) -> None:
    feed, channel = subscribed
    with feed.loan(MIB) as loan:
        loan.buffer[:5] = b"never"
    with pytest.raises(ValueError):
        loan.send()
    with pytest.raises(RuntimeError):
        with feed.loan(MIB) as loan:
            raise RuntimeError("the producer failed half-way")
    dropped = feed.loan(MIB)
    del dropped
    gc.collect()
    for _ in range(3 * _spill.POOL_FILES):  # files come round: none is lost to a loan
        with feed.loan(MIB) as loan:
            loan.send()
        channel.recv(timeout=5)
    assert len(channel) == 0
    assert len(_pool_files(namespace, os.getpid())) <= _spill.POOL_FILES


@pytest.mark.parametrize("subscribed", [1], indirect=True)  # capacity
def test_a_loan_on_a_full_channel_times_out_like_a_send(subscribed: Subscribed) -> None:
    feed, channel = subscribed
    feed.send(b"first")
    loan = feed.loan(MIB)
    with pytest.raises(shmfeed.FeedSendTimeout):
        loan.send(timeout=0.2)
    with pytest.raises(ValueError, match="sent or discarded"):
        loan.buffer  # the loan ended with its send
    assert channel.recv(timeout=5) == b"first"
    assert len(channel) == 0


@pytest.mark.parametrize("size, error", [
    (0, ValueError), (-1, ValueError), (1 << 32, ValueError), (True, TypeError), (1.5, TypeError), ("10", TypeError),
])
def test_a_bad_loan_size_is_refused_clearly(size: object, error: type[Exception], namespace: str) -> None:
    feed: shmfeed.Feed[bytes] = shmfeed.Feed()
    try:
        with pytest.raises(error, match="loan size"):
            feed.loan(size)  # type: ignore[arg-type]
        assert _pool_files(namespace) == []
    finally:
        feed.close()


def test_a_loan_of_a_feed_of_another_type_or_a_closed_feed_is_refused(namespace: str) -> None:
    typed: shmfeed.Feed[str] = shmfeed.Feed(elem_type=str)
    with pytest.raises(shmfeed.FeedTypeError, match="got bytes, want str"):
        typed.loan(10)
    typed.close()
    unfixed: shmfeed.Feed[object] = shmfeed.Feed()
    loan = unfixed.loan(10)
    unfixed.send("a str fixes the type first")
    with pytest.raises(shmfeed.FeedTypeError):
        loan.send()
    unfixed.close()
    with pytest.raises(shmfeed.FeedClosed):
        unfixed.loan(10)
    pool = _spill._pools.get(namespace, [])
    assert len(pool) == 1 and not pool[0].busy  # the failed send's file is back, for the next value


def test_a_loan_cannot_be_pickled(namespace: str) -> None:
    import pickle

    feed: shmfeed.Feed[bytes] = shmfeed.Feed()
    try:
        with feed.loan(10) as loan, pytest.raises(TypeError, match="belongs to the process that took it"):
            pickle.dumps(loan)
    finally:
        feed.close()


def test_a_loan_does_not_cross_fork(subscribed: Subscribed) -> None:
    feed, channel = subscribed
    loan = feed.loan(MIB)
    loan.buffer[:4] = b"mine"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=LW.use_a_parents_loan, args=(loan, results))
    child.start()
    assert "belongs to the process that took it" in results.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    assert loan.send() == 1
    assert channel.recv(timeout=5)[:4] == b"mine"


def test_a_sigkilled_borrower_leaves_nothing(
    mp_context: multiprocessing.context.BaseContext, subscribed: Subscribed, namespace: str
) -> None:
    feed, channel = subscribed
    ready = mp_context.Queue()
    borrower = mp_context.Process(target=LW.loan_then_wait, args=(feed, 2 * MIB, ready))
    borrower.start()
    pid = ready.get(timeout=30)
    assert len(_pool_files(namespace, pid)) == 1
    os.kill(pid, signal.SIGKILL)
    borrower.join(30)
    # The registry sweeps a dead process's pool files; the feed goes on.
    wait_until(lambda: not _pool_files(namespace, pid), timeout=20)
    assert feed.send(b"after") == 1
    assert channel.recv(timeout=5) == b"after"


def test_an_asyncio_producer_sends_loans_to_a_slow_reader_in_another_process(
    mp_context: multiprocessing.context.BaseContext, subscribed: Subscribed
) -> None:
    """``send_async`` waits for room without blocking the loop; values arrive whole and in order."""
    feed, channel = subscribed  # capacity 4: the producer waits for room
    sizes = [MIB, 10, 2 * MIB, 70_000] * 3
    results = mp_context.Queue()
    reader = mp_context.Process(target=LW.receive_digests, args=(channel, len(sizes), results))
    reader.start()
    try:
        assert LW.loan_and_send_async(feed, sizes, seed=3) == [1] * len(sizes)
        expected = [("bytes", size, LW.digest(LW.pattern(size, 3 + index))) for index, size in enumerate(sizes)]
        assert results.get(timeout=60) == expected
    finally:
        reader.join(30)
    assert reader.exitcode == 0


@pytest.mark.parametrize("subscribed", [1], indirect=True)  # capacity
def test_a_cancelled_send_async_of_a_loan_delivers_nothing_and_ends_the_loan(
    subscribed: Subscribed, namespace: str
) -> None:
    import asyncio

    feed, channel = subscribed
    feed.send(b"fills it")
    core = channel._live_core()

    async def cancelled() -> shmfeed.Loan:
        loan = feed.loan(MIB)
        task = asyncio.ensure_future(loan.send_async())
        deadline = time.monotonic() + 10
        while not core.words[L.SEND_WAITING]:  # until the send waits for room in the full channel
            assert time.monotonic() < deadline, "the send never waited for room"
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return loan

    loan = asyncio.run(cancelled())
    with pytest.raises(ValueError, match="sent or discarded"):
        loan.buffer
    assert not any(file.busy for file in _spill._pools.get(namespace, []))  # its file is back
    assert channel.recv(timeout=5) == b"fills it" and len(channel) == 0  # nobody got the loan's value
    assert feed.send(b"next", timeout=2) == 1  # the send lock is free
    assert channel.recv(timeout=5) == b"next"
