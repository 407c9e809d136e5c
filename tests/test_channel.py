"""Channel behaviour within one process (cross-process cases are in test_crossprocess)."""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
import time

import pytest

import shmfeed
from shmfeed import _channel, _layout, _ring

pytestmark = pytest.mark.timeout(60)


def test_values_come_out_in_order_and_len_counts_them():
    with shmfeed.Channel() as channel:
        for value in range(10):
            channel.send(value)
        assert len(channel) == 10
        assert [channel.recv() for _ in range(10)] == list(range(10))
        assert len(channel) == 0


def test_recv_polls_with_zero_timeout_and_waits_with_a_timeout():
    with shmfeed.Channel() as channel:
        with pytest.raises(TimeoutError):
            channel.recv(timeout=0)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            channel.recv(timeout=0.1)
        assert time.monotonic() - started >= 0.09


def test_send_blocks_while_full_until_a_value_is_taken():
    with shmfeed.Channel(capacity=2) as channel:
        channel.send(1)
        channel.send(2)
        with pytest.raises(TimeoutError):
            channel.send(3, timeout=0.05)
        taker = threading.Thread(target=channel.recv)
        sent = threading.Event()

        def send_third() -> None:
            channel.send(3)
            sent.set()

        sender = threading.Thread(target=send_third)
        sender.start()
        assert not sent.wait(0.1)
        taker.start()
        assert sent.wait(10)
        sender.join()
        taker.join()
        assert [channel.recv(), channel.recv()] == [2, 3]


def test_close_drains_then_raises_and_wakes_a_waiting_receiver():
    channel = shmfeed.Channel()
    channel.send("last")
    channel.close()
    assert channel.closed
    assert channel.recv() == "last"
    with pytest.raises(shmfeed.ChannelClosed):
        channel.recv()
    with pytest.raises(shmfeed.ChannelClosed):
        channel.send(1)

    other = shmfeed.Channel()
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            other.recv(timeout=20)
        except BaseException as error:  # noqa: BLE001 - recorded for the assertion
            outcome.append(error)

    waiter = threading.Thread(target=wait)
    waiter.start()
    while other.statistics().waiting_receivers == 0:
        time.sleep(0.001)
    other.close()
    waiter.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], shmfeed.ChannelClosed)


def test_iteration_ends_when_closed():
    channel = shmfeed.Channel()
    for value in "abc":
        channel.send(value)
    channel.close()
    assert list(channel) == ["a", "b", "c"]


def test_typed_channel_refuses_other_types():
    channel = shmfeed.Channel(int)
    channel.send(5)
    with pytest.raises(shmfeed.FeedTypeError, match="event: wrong type in Send got str, want int"):
        channel.send("five")
    with pytest.raises(TypeError):
        channel.send(True)  # exact types: bool is not int
    assert channel.elem_type is int
    assert shmfeed.Channel[str]().elem_type is str


def test_a_channel_pickles_to_a_handle_on_the_same_channel():
    channel = shmfeed.Channel()
    copy = pickle.loads(pickle.dumps(channel))
    assert copy == channel and hash(copy) == hash(channel)
    copy.send("via copy")
    assert channel.recv() == "via copy"


def test_a_channel_travels_inside_an_event():
    carrier, reply = shmfeed.Channel(), shmfeed.Channel()
    carrier.send({"reply_to": reply, "n": 7})
    event = carrier.recv()
    event["reply_to"].send(event["n"] * 6)
    assert reply.recv(timeout=5) == 42


def test_values_larger_than_the_ring_are_delivered():
    channel = shmfeed.Channel(capacity=4, buffer_size=4096)
    big = bytes(range(256)) * 400
    channel.send(big)
    channel.send("small")
    assert channel.recv() == big
    assert channel.recv() == "small"


def test_drop_newest_skips_and_counts():
    channel = shmfeed.Channel(capacity=2, overflow="drop_newest")
    for value in range(5):
        channel.send(value)
    assert [channel.recv(), channel.recv()] == [0, 1]
    assert channel.statistics().dropped == 3


def test_drop_oldest_discards_and_counts():
    channel = shmfeed.Channel(capacity=2, overflow="drop_oldest")
    for value in range(5):
        channel.send(value)
    assert [channel.recv(), channel.recv()] == [3, 4]
    assert channel.statistics().dropped == 3


def test_statistics_report_the_counters():
    channel = shmfeed.Channel(capacity=8)
    channel.send(1)
    channel.send(2)
    channel.recv()
    stats = channel.statistics()
    assert (stats.sent, stats.received, stats.fill, stats.capacity) == (2, 1, 1, 8)
    assert stats.bytes_sent > 0 and not stats.closed
    with pytest.raises(Exception):
        stats.sent = 5  # frozen


def test_corrupt_bytes_in_the_ring_raise_a_clean_error_and_the_channel_recovers():
    channel = shmfeed.Channel(capacity=8)
    channel.send("fine")
    core = channel._core
    assert core is not None
    # A hostile writer scribbles over the record header.
    core.buffer[_layout.HEADER_BYTES : _layout.HEADER_BYTES + 8] = b"\xff" * 8
    with pytest.raises(shmfeed.ChannelCorruptError):
        channel.recv(timeout=1)
    channel.send("after")
    assert channel.recv(timeout=1) == "after"


def test_corrupt_payload_raises_a_clean_error():
    channel = shmfeed.Channel(capacity=8)
    channel.send(b"x" * 40)
    core = channel._core
    assert core is not None
    start = _layout.HEADER_BYTES + 8
    core.buffer[start : start + 40] = b"\xc1" * 40  # 0xc1 is never valid msgpack
    with pytest.raises(shmfeed.ChannelCorruptError):
        channel.recv(timeout=1)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"capacity": 0}, ValueError),
        ({"capacity": "10"}, ValueError),
        ({"buffer_size": 10}, ValueError),
        ({"overflow": "explode"}, ValueError),
        ({"elem_type": "int"}, TypeError),
        ({"elem_type": True}, TypeError),  # a bool is no capacity
        ({"elem_type": 5, "capacity": 5}, TypeError),  # the capacity twice
        ({"elem_type": 0}, ValueError),  # Channel(0): a capacity below 1
        ({"name": ""}, ValueError),
        ({"name": "tab\there"}, ValueError),
        ({"name": "x" * 129}, ValueError),
        ({"name": "é" * 65}, ValueError),  # 65 characters, 130 bytes
        ({"name": 5}, TypeError),
    ],
)
def test_bad_arguments_are_refused(kwargs, error):
    with pytest.raises(error):
        shmfeed.Channel(**kwargs)


def test_bad_timeouts_are_refused():
    with shmfeed.Channel() as channel:
        with pytest.raises(TypeError):
            channel.recv(timeout="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            channel.send(1, timeout=float("nan"))


def test_unencodable_values_raise_before_anything_is_sent():
    with shmfeed.Channel() as channel:
        with pytest.raises(TypeError):
            channel.send(object())
        assert len(channel) == 0


def test_recv_async_and_async_for():
    channel = shmfeed.Channel()

    async def main() -> list[int]:
        async def produce() -> None:
            for value in range(5):
                await asyncio.sleep(0)
                channel.send(value)
            channel.close()

        producer = asyncio.create_task(produce())
        got = [value async for value in channel]
        await producer
        return got

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]


def test_cancelled_recv_async_loses_nothing():
    channel = shmfeed.Channel()

    async def main() -> object:
        waiting = asyncio.create_task(channel.recv_async())
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        channel.send("kept")
        return await channel.recv_async(timeout=5)

    assert asyncio.run(main()) == "kept"


def test_recv_async_times_out():
    channel = shmfeed.Channel()

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await channel.recv_async(timeout=0.05)

    asyncio.run(main())


def test_many_threads_send_and_receive_without_loss():
    channel = shmfeed.Channel(capacity=16)
    received: list[int] = []
    lock = threading.Lock()

    def receive() -> None:
        for value in channel:
            with lock:
                received.append(value)

    def send(base: int) -> None:
        for value in range(base, base + 500):
            channel.send(value)

    receivers = [threading.Thread(target=receive) for _ in range(3)]
    senders = [threading.Thread(target=send, args=(base,)) for base in (0, 1000, 2000)]
    for thread in receivers + senders:
        thread.start()
    for thread in senders:
        thread.join()
    channel.close()
    for thread in receivers:
        thread.join()
    assert sorted(received) == sorted(list(range(500)) + list(range(1000, 1500)) + list(range(2000, 2500)))


def test_wrap_around_keeps_records_intact():
    channel = shmfeed.Channel(capacity=1000, buffer_size=4096)
    for round_ in range(50):
        values = [bytes([round_ % 256]) * size for size in (1, 100, 333, 700)]
        for value in values:
            channel.send(value)
        assert [channel.recv() for _ in values] == values
    assert channel._core is not None and channel._core.words[_layout.WRITE_POS] > 4096 * 10


def test_spill_threshold_is_a_quarter_of_the_ring():
    channel = shmfeed.Channel(buffer_size=4096)
    assert channel._core is not None
    assert channel._core.spill_threshold == 1024
    assert _ring.default_ring_bytes(1024) == 512 * 1024


def test_an_int_first_is_the_capacity_and_a_type_first_the_element_type():
    with shmfeed.Channel(64) as by_position, shmfeed.Channel(capacity=64) as by_keyword:
        assert by_position.capacity == by_keyword.capacity == 64
        assert by_position.elem_type is None
        assert by_position.statistics().ring_bytes == by_keyword.statistics().ring_bytes
    with shmfeed.Channel(int) as typed, shmfeed.Channel(int, 16) as both:
        assert typed.elem_type is int and typed.capacity == 1024
        assert both.elem_type is int and both.capacity == 16
    with shmfeed.Channel[str](16) as generic:
        assert generic.elem_type is str and generic.capacity == 16
    with pytest.raises(TypeError, match="capacity twice"):
        shmfeed.Channel(64, capacity=64)
    with pytest.raises(TypeError, match="capacity twice"):
        shmfeed.Channel(64, 64)


def test_a_label_is_shown_in_repr_and_kept_in_the_segment():
    with shmfeed.Channel(8, name="ticks-worker-3") as channel, shmfeed.Channel() as unnamed:
        assert channel.name == "ticks-worker-3" and unnamed.name is None
        assert "'ticks-worker-3'" in repr(channel) and f"{channel._channel_id:016x}" in repr(channel)
        words, buffer = channel._live_core().words, channel._live_core().buffer
        assert _layout.read_text(buffer, _layout.CHANNEL_NAME_OFFSET, int(words[_layout.CHANNEL_NAME_LEN]),
                                 _layout.CHANNEL_NAME_MAX) == "ticks-worker-3"
        assert unnamed._live_core().words[_layout.CHANNEL_NAME_LEN] == 0
        assert pickle.loads(pickle.dumps(channel)).name == "ticks-worker-3"
        longest = "é" * 64  # 128 bytes: the most the header holds
        with shmfeed.Channel(name=longest) as full:
            assert full.name == longest == _channel._label_of(full._live_core())  # as another process reads it


@pytest.mark.parametrize("path", ["c", "python"])
def test_the_readers_table_keeps_each_reader_and_makes_room_by_the_oldest(path, monkeypatch):
    if path == "c" and _ring._accel is None:
        pytest.skip("the C path is not built")
    if path == "python":
        monkeypatch.setattr(_ring, "_accel", None)
    with shmfeed.Channel(8) as channel:
        core = channel._live_core()
        assert (core._fast is not None) == (path == "c")
        words = core.words
        channel.send(1)
        channel.recv(timeout=5)
        assert [pid for pid, _ in _layout.readers(words)] == [os.getpid()]
        first = _layout.readers(words)[0][1]
        channel.send(2)
        channel.recv(timeout=5)
        assert [pid for pid, _ in _layout.readers(words)] == [os.getpid()]  # its own entry again
        assert _layout.readers(words)[0][1] >= first
        # Fill the table with other readers, ours the oldest but one: a receive keeps ours.
        table = _layout.READERS_FIRST_WORD
        for entry in range(_layout.READER_SLOTS):
            if words[table + 2 * entry] != os.getpid():
                words[table + 2 * entry] = 1_000_000 + entry
                words[table + 2 * entry + 1] = 10 + entry
        channel.send(3)
        channel.recv(timeout=5)
        pids = [pid for pid, _ in _layout.readers(words)]
        assert len(pids) == _layout.READER_SLOTS and pids[0] == os.getpid() and pids.count(os.getpid()) == 1
        # A new reader (ours taken by another) takes the entry read longest ago: 1_000_001's.
        own = next(e for e in range(_layout.READER_SLOTS) if words[table + 2 * e] == os.getpid())
        words[table + 2 * own], words[table + 2 * own + 1] = 2_000_000, 10_000
        oldest = min((e for e in range(_layout.READER_SLOTS) if e != own), key=lambda e: words[table + 2 * e + 1])
        gone = int(words[table + 2 * oldest])
        channel.send(4)
        channel.recv(timeout=5)
        pids = [pid for pid, _ in _layout.readers(words)]
        assert pids[0] == os.getpid() and len(pids) == _layout.READER_SLOTS
        assert 2_000_000 in pids and gone not in pids and words[table + 2 * oldest] == os.getpid()


def test_a_channel_core_keeps_few_enough_attributes_for_fast_access():
    # CPython 3.11 keeps an instance's attributes in their fast inline form only while its
    # class's shared keys stay small: measured, a ChannelCore with 29 attributes sends and
    # receives at full speed, one with 30 about 100 ns slower per send+recv (that is why the
    # readers-table hint and the label live outside it). Break: add two attributes.
    with shmfeed.Channel(8) as channel:
        channel.send(1)
        channel.recv(timeout=5)
        assert len(vars(channel._live_core())) <= 29, sorted(vars(channel._live_core()))


def test_what_senders_write_and_what_receivers_write_share_no_cache_line():
    # A 64-byte line holding words of both sides moves between their cores at every value:
    # small x1 ran at 0.63-0.75M events/s so, 1.1M with the lines apart. Break: put
    # READ_POS back next to WRITE_POS in _layout.
    from shmfeed import _layout as L

    def line(word: int) -> int:
        return word * 8 // 64

    senders = {L.WRITE_POS, L.SENT, L.DROPPED, L.EVICTED, L.SPILLED, L.LOCK_OWNER}
    receivers = {L.READ_POS, L.RECEIVED, L.RECV_LOCK_OWNER, L.LAST_RECV_PID, L.LAST_RECV_TIME, L.DISCARDED}
    assert not {line(w) for w in senders} & {line(w) for w in receivers}
    assert len({line(w) for w in senders - {L.LOCK_OWNER}}) == 1  # one line per send, the lock's owner apart
    assert len({line(w) for w in receivers}) == 1


def test_an_exception_while_waking_keeps_a_committed_large_value(monkeypatch) -> None:
    # A signal handler's exception (Ctrl-C) can arrive while the sender wakes a receiver,
    # after the value is in the ring: its file must stay, or the receiver gets nothing.
    from shmfeed import _layout, _ring

    channel = shmfeed.Channel()
    words = channel._core.words

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_ring.ChannelCore, "_wake", interrupted)
    words[_layout.RECV_WAITING] = 1  # as if a receiver slept on it
    try:
        with pytest.raises(KeyboardInterrupt):
            channel.send(b"v" * (1 << 20))
    finally:
        words[_layout.RECV_WAITING] = 0
        monkeypatch.undo()
    assert channel.recv(timeout=5) == b"v" * (1 << 20)
    channel.close()
