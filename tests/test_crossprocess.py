"""Feeds and channels across processes, under every start method (fork, spawn, forkserver).

Synchronisation is by handshakes only: children say "ready" on a results channel, the
parent waits for it. Process targets live in ``_workers`` (importable by spawn and
forkserver children); each takes the test's namespace first (see ``_workers``).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import numpy as np
import psutil
import pytest

import _workers as W
import shmfeed
from shmfeed.testing import running, wait_until

RESULT_TIMEOUT = 60.0


# --- helpers ------------------------------------------------------------------------------------


def _get(results: shmfeed.Channel, timeout: float = RESULT_TIMEOUT) -> Any:
    """The next report of a child; a child's error report fails the test with its traceback."""
    message = results.recv(timeout=timeout)
    if isinstance(message, tuple) and message and message[0] == "error":
        pytest.fail(f"child {message[1]} failed:\n{message[2]}")
    return message


# --- 1. one feed, four subscriber processes -------------------------------------------------------


@pytest.mark.timeout(90)
def test_fanout_to_four_processes(mp_context, namespace):
    n = 10_000
    feed = shmfeed.Feed("ticks")
    results = shmfeed.Channel()
    # Two children get a channel the parent subscribed; two subscribe themselves.
    given = [shmfeed.Channel(capacity=256) for _ in range(2)]
    subs = [feed.subscribe(channel) for channel in given]
    specs = [(W.fanout_given_channel, (namespace, results, channel, n)) for channel in given]
    specs += [(W.fanout_self_subscribed, (namespace, results, "ticks", n)) for _ in range(2)]
    with running(mp_context, *specs):
        ready = [_get(results) for _ in range(2)]
        assert [m[0] for m in ready] == ["ready", "ready"]
        counts = {feed.send(i) for i in range(n)}
        assert counts == {4}
        assert feed.send(-1) == 4
        done = [_get(results) for _ in range(4)]
    assert sorted((m[0], m[2], m[3]) for m in done) == [("done", n, True)] * 4
    assert len({m[1] for m in done}) == 4
    for sub in subs:
        sub.unsubscribe()
    assert feed.send(0) == 0  # the children unsubscribed their own before exiting


# --- 2. two sending processes, three subscribers, one total order ----------------------------------


@pytest.mark.timeout(90)
def test_two_senders_one_total_order(mp_context, namespace):
    n = 2_000
    feed = shmfeed.Feed("orders")
    results = shmfeed.Channel()
    channels = [shmfeed.Channel(capacity=128) for _ in range(3)]
    subs = [feed.subscribe(channel) for channel in channels]
    go = mp_context.Event()
    specs = [(W.ordered_sender, (namespace, results, "orders", sid, n, go)) for sid in (1, 2)]
    # channels[0] is read here in the parent, the other two by reader processes.
    specs += [(W.ordered_reader, (namespace, results, i, channels[i], 2 * n)) for i in (1, 2)]
    with running(mp_context, *specs):
        assert sorted(_get(results) for _ in range(2)) == [("ready", 1), ("ready", 2)]
        go.set()
        mine = [channels[0].recv(timeout=RESULT_TIMEOUT) for _ in range(2 * n)]
        reports = [_get(results) for _ in range(4)]
    sent = sorted(m for m in reports if m[0] == "sent")
    assert sent == [("sent", 1, [3]), ("sent", 2, [3])]
    seen = {m[1]: m[2] for m in reports if m[0] == "read"}
    seen[0] = mine
    assert sorted(seen) == [0, 1, 2]
    assert all(type(v) is tuple for v in mine)
    assert seen[1] == mine and seen[2] == mine  # one order for every channel
    for sid in (1, 2):
        assert [seq for s, seq in mine if s == sid] == list(range(n))
    assert len(mine) == 2 * n
    assert len(channels[0]) == 0  # nothing extra
    for sub in subs:
        sub.unsubscribe()


# --- 3. one channel as a work queue for three processes ---------------------------------------------


@pytest.mark.timeout(90)
def test_work_queue_each_value_once(mp_context, namespace):
    n = 3_000
    queue = shmfeed.Channel(capacity=64)
    results = shmfeed.Channel()
    specs = [(W.queue_worker, (namespace, results, i, queue)) for i in range(3)]
    with running(mp_context, *specs):
        assert sorted(_get(results) for _ in range(3)) == [("ready", i) for i in range(3)]
        for i in range(n):
            queue.send(i)
        queue.close()  # only after every value was sent; the rest is drained first
        reports = [_get(results) for _ in range(3)]
    taken = {m[1]: m[2] for m in reports}
    assert sorted(taken) == [0, 1, 2]
    everything = [v for values in taken.values() for v in values]
    assert len(everything) == n
    assert sorted(everything) == list(range(n))  # none lost, none twice
    for values in taken.values():
        assert values == sorted(values)  # one sender: each receiver sees its values in order
    assert queue.statistics().received == n


# --- 4. a multiprocessing.Pool whose workers subscribe in their initializer ---------------------------


@pytest.mark.timeout(120)
def test_pool_workers_subscribed_in_initializer(mp_context, namespace):
    n, workers = 500, 3
    feed = shmfeed.Feed("jobs")
    results = shmfeed.Channel()
    pool = mp_context.Pool(workers, initializer=W.pool_init, initargs=(namespace, results, "jobs", n))
    try:
        ready = [_get(results) for _ in range(workers)]
        pids = {m[1] for m in ready}
        assert [m[0] for m in ready] == ["ready"] * workers and len(pids) == workers
        assert {feed.send(i) for i in range(n)} == {workers}
        done = [_get(results) for _ in range(workers)]
        assert sorted(done) == sorted(("done", pid, n, True) for pid in pids)
        # Ordinary tasks still run, on workers whose channels got every value.
        answers = [pool.apply_async(W.pool_task, (x,)) for x in range(6)]
        for x, answer in enumerate(answers):
            pid, received, square = answer.get(RESULT_TIMEOUT)
            assert pid in pids and received == n and square == x * x
        pool.close()
        pool.join()
    finally:
        pool.terminate()  # no-op after a successful close/join
    assert feed.send(n) == 0  # the workers' subscriptions ended when they exited


# --- 5. a 64 MiB value through a feed to another process ---------------------------------------------


@pytest.mark.timeout(120)
def test_large_value_through_feed(mp_context, namespace):
    value = os.urandom(64 * 1024 * 1024)
    feed = shmfeed.Feed()
    channel = shmfeed.Channel(capacity=4)
    results = shmfeed.Channel()
    sub = feed.subscribe(channel)
    with running(mp_context, (W.digest_one, (namespace, results, channel))):
        assert _get(results)[0] == "ready"
        assert feed.send(value) == 1
        report = _get(results)
    assert report == ("digest", "bytes", len(value), hashlib.sha256(value).hexdigest())
    sub.unsubscribe()


# --- 6. every encodable type, echoed by another process ----------------------------------------------


def _encodable_values(reply: shmfeed.Channel) -> list[Any]:
    aware = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    return [
        None,
        True,
        False,
        2**100,
        -(2**100),
        3.25,
        "héllo ✓",
        b"\x00\xffbytes",
        bytearray(b"\x01\x02"),
        [1, "two", [3.0]],
        (1, (2, "x"), ()),
        {(1, 2): "tuple key", ("a",): [1], "plain": {"nested": (4,)}},
        {1, "a", (2, 3)},
        frozenset({1, 2, frozenset({3})}),
        datetime(2024, 2, 29, 23, 59, 58, 123456),
        aware,
        datetime(2020, 1, 1, tzinfo=timezone.utc),
        date(1999, 12, 31),
        timedelta(days=-3, seconds=7, microseconds=11),
        Decimal("3.14159265358979323846264338327950288"),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        W.Color.RED,
        W.Color.GREEN,
        W.Point(1, 2.5, ["a", "b"]),
        W.Pair(W.Color.GREEN, (1, {2})),
        np.arange(24, dtype=np.int16).reshape(2, 3, 4),
        np.array([[1.5, -2.0], [np.inf, 0.0]], dtype=">f8"),
        reply,
        {"reply_to": reply, "points": [W.Point(0, 0.0, [])]},
    ]


def _assert_same(out: Any, sent: Any) -> None:
    assert type(out) is type(sent), (out, sent)
    if isinstance(sent, np.ndarray):
        assert out.dtype == sent.dtype and out.shape == sent.shape and np.array_equal(out, sent)
        return
    assert out == sent
    if isinstance(sent, datetime):
        assert out.utcoffset() == sent.utcoffset() and out.tzinfo == sent.tzinfo


@pytest.mark.timeout(90)
def test_every_encoding_type_round_trips_through_a_process(mp_context, namespace):
    inbox, results, reply = shmfeed.Channel(), shmfeed.Channel(), shmfeed.Channel()
    values = _encodable_values(reply)
    with running(mp_context, (W.echo, (namespace, results, inbox))):
        for value in values:
            inbox.send(value)
            out = _get(results)
            _assert_same(out, value)
            if isinstance(value, dict) and "reply_to" in value:
                assert type(out["reply_to"]) is shmfeed.Channel and out["reply_to"] == reply
                assert type(out["points"][0]) is W.Point
        inbox.close()
        assert _get(results)[0] == "echo-done"
    # The child answered on the Channel it received as a value.
    assert reply.recv(timeout=RESULT_TIMEOUT)[0] == "pong"
    assert len(reply) == 0


# --- 7. an unencodable value reaches nobody -------------------------------------------------------------


@pytest.mark.timeout(90)
def test_unencodable_value_reaches_no_subscriber(mp_context, namespace):
    feed = shmfeed.Feed("sets")
    channel, results = shmfeed.Channel(), shmfeed.Channel()
    local = shmfeed.Channel()
    subs = [feed.subscribe(channel), feed.subscribe(local)]
    with running(mp_context, (W.first_values, (namespace, results, channel, 2))):
        assert _get(results)[0] == "ready"
        assert feed.send({1}) == 2
        for bad in ({lambda: 0}, {1, object()}, {frozenset({1, object()})}):
            with pytest.raises(shmfeed.EncodingError) as info:
                feed.send(bad)
            assert isinstance(info.value, TypeError)
        assert feed.send({2}) == 2
        assert _get(results) == ("got", [{1}, {2}])
    assert [local.recv(timeout=0), local.recv(timeout=0)] == [{1}, {2}]
    assert len(local) == 0 and len(channel) == 0
    for sub in subs:
        sub.unsubscribe()


# Regression: Feed.send used to fix the feed's type before encoding, so a failed first
# send left the feed typed as the unencodable value's type.
@pytest.mark.timeout(30)
def test_failed_first_send_does_not_fix_the_feed_type():
    feed = shmfeed.Feed("fresh")
    channel = shmfeed.Channel()
    sub = feed.subscribe(channel)
    try:
        with pytest.raises(shmfeed.EncodingError):
            feed.send(object())
        assert feed.send("first real value") == 1  # not FeedTypeError "... want object"
        assert channel.recv(timeout=0) == "first real value"
    finally:
        sub.unsubscribe()
        channel.close()


# --- 8. waiting uses no CPU ----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_blocked_recv_and_select_use_no_cpu(mp_context, namespace):
    lone, a, b = shmfeed.Channel(), shmfeed.Channel(), shmfeed.Channel()
    results = shmfeed.Channel()
    specs = [(W.block_in_recv, (namespace, results, lone)), (W.block_in_select, (namespace, results, a, b))]
    with running(mp_context, *specs):
        blocking = {m[1]: m[2] for m in (_get(results) for _ in range(2))}
        assert sorted(blocking) == ["recv", "select"]
        wait_until(lambda: all(c.statistics().waiting_receivers == 1 for c in (lone, a, b)))
        procs = [psutil.Process(blocking[k]) for k in ("recv", "select")]
        before = [p.cpu_times() for p in procs]
        time.sleep(1.0)  # the measured interval
        after = [p.cpu_times() for p in procs]
        for kind, t0, t1 in zip(("recv", "select"), before, after):
            used = (t1.user + t1.system) - (t0.user + t0.system)
            assert used < 0.02, f"{kind} used {used:.3f} s of CPU in 1 s while blocked"
        lone.send("wake-recv")
        b.send("wake-select")
        woke = sorted(_get(results) for _ in range(2))
    assert woke == [("woke", "recv", "wake-recv"), ("woke", "select", "b", "wake-select")]
