"""The patterns users write first: exits with daemon threads, short-lived senders, pools,
objects made before a fork, dropped channels, consumer loops and the monitor's view.

Each scenario below failed (crashed, lost values, failed a healthy subscription or hung)
before the fixes it guards; synchronisation is by queues and events, never by sleeping.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

import shmfeed
from shmfeed import _gc, _inspect, _registry_client
import _lifecycle_workers as W
from _kill_workers import wait_watched
from shmfeed.testing import registry_pid, wait_until

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)
import exit_check  # noqa: E402

WAIT = 30.0
NO_ERROR_WINDOW = 1.5  # longer than the registry's promise: a death is handled within 1 s


def _subscribed(namespace: str, feed_name: str, capacity: int) -> tuple[shmfeed.Feed, shmfeed.Channel, Any]:
    """A named feed, a channel subscribed to it, the subscription; the registry running."""
    feed = shmfeed.Feed(feed_name)
    channel = shmfeed.Channel(capacity=capacity)
    sub = feed.subscribe(channel)
    registry_pid(namespace)
    return feed, channel, sub


def _no_error_within(sub: shmfeed.Subscription, seconds: float = NO_ERROR_WINDOW) -> None:
    with pytest.raises(TimeoutError):
        error = sub.err().recv(timeout=seconds)
        pytest.fail(f"the subscription ended: {error!r}")


# --- 1. exit while a daemon thread waits inside the library ------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("call", exit_check.CALLS)
def test_exit_is_clean_while_a_daemon_thread_waits(call: str) -> None:
    for _ in range(3):
        status, stderr, left = exit_check.run_once(call)
        assert status == 0, f"{call}: exit status {status}\n{stderr[-2000:]}"
        assert "Traceback" not in stderr, stderr[-2000:]
        assert left == [], left


# --- 3. a sender that exits normally is not a death --------------------------------------


@pytest.mark.timeout(60)
def test_a_sender_that_exits_normally_fails_nobody(namespace: str) -> None:
    feed, channel, sub = _subscribed(namespace, "clean-exit", 1024)
    subprocess.run([sys.executable, "-c", "import shmfeed; shmfeed.Feed('clean-exit').send('hi')"],
                   check=True, timeout=WAIT)
    assert channel.recv(timeout=5) == "hi"
    _no_error_within(sub)
    assert feed.send("x") == 1 and channel.recv(timeout=5) == "x"


@pytest.mark.timeout(120)
def test_pool_workers_that_publish_and_return_fail_nobody(mp_context: Any, namespace: str) -> None:
    feed, channel, sub = _subscribed(namespace, "pool-publish", 256)
    with mp_context.Pool(4) as pool:  # its end terminates the workers (SIGTERM)
        sent = pool.starmap(W.publish, [(namespace, "pool-publish", i) for i in range(40)])
    assert sent == [1] * 40
    assert sorted(channel.recv(timeout=5) for _ in range(40)) == list(range(40))
    _no_error_within(sub)
    assert feed.send(99) == 1 and channel.recv(timeout=5) == 99


@pytest.mark.timeout(180)
def test_pool_of_one_task_workers_stays_healthy_until_a_sender_is_killed(mp_context: Any, namespace: str) -> None:
    feed, channel, sub = _subscribed(namespace, "rounds", 64)
    reports = shmfeed.Channel()  # a task argument (no Manager: under fork it would hold our objects)
    with mp_context.Pool(2, maxtasksperchild=1) as pool:
        for round_ in range(20):
            values = [(round_, worker) for worker in range(2)]
            # chunksize given: Pool computes it from len(self._pool), which is 0 for a moment
            # while maxtasksperchild replaces workers (ZeroDivisionError, a CPython race).
            assert pool.starmap(W.publish, [(namespace, "rounds", v) for v in values], chunksize=1) == [1, 1]
            assert sorted(channel.recv(timeout=5) for _ in values) == values
        _no_error_within(sub, 0.5)
        pool.apply_async(W.publish_then_report_and_wait, (namespace, "rounds", (20, 0), reports))
        pid = reports.recv(timeout=WAIT)
        assert channel.recv(timeout=5) == (20, 0)
        wait_watched(namespace, pid)
        os.kill(pid, signal.SIGKILL)
        error = sub.err().recv(timeout=5)
    assert isinstance(error, shmfeed.SenderDiedError), repr(error)


@pytest.mark.timeout(120)
def test_a_process_that_detached_may_die_without_failing_anyone(mp_context: Any, namespace: str) -> None:
    feed, channel, sub = _subscribed(namespace, "detached", 1024)
    reports = shmfeed.Channel()
    child = mp_context.Process(target=W.send_in_block_then_wait, args=(namespace, "detached", 5, reports))
    child.start()
    pid = reports.recv(timeout=WAIT)
    assert channel.recv(timeout=5) == 5
    wait_watched(namespace, pid)
    os.kill(pid, signal.SIGKILL)  # after its with-block: it had stopped sending
    child.join(WAIT)
    _no_error_within(sub)
    with feed:  # detach() also ends the subscriptions made through this object
        pass
    assert sub.err().recv(timeout=5) is None
    with pytest.raises(shmfeed.FeedClosed, match="detached"):
        feed.send(6)


# --- 2. every sender is tracked, however many ---------------------------------------------


@pytest.mark.timeout(180)
def test_the_33rd_sender_is_tracked(mp_context: Any, namespace: str) -> None:
    feed, channel, sub = _subscribed(namespace, "many", 2048)
    sent, go = mp_context.Queue(), mp_context.Event()
    last_values = [1000 + i for i in range(40)]
    specs = [(namespace, "many", [i], sent, go) for i in range(32)] + [(namespace, "many", last_values, sent, go)]
    processes = [mp_context.Process(target=W.send_then_wait, args=spec) for spec in specs]
    for process in processes:
        process.start()
    for _ in processes:
        sent.get(timeout=WAIT)
    for process in processes[:32]:
        process.join(WAIT)
        assert process.exitcode == 0
    _no_error_within(sub)  # 32 senders left normally; the 33rd lives on
    go.set()
    processes[32].join(WAIT)
    got = [channel.recv(timeout=5) for _ in range(72)]
    assert sorted(v for v in got if v < 1000) == list(range(32))
    assert [v for v in got if v >= 1000] == last_values  # one sender: in order
    _no_error_within(sub, 0.5)


@pytest.mark.timeout(180)
def test_a_hundred_concurrent_senders(namespace: str) -> None:
    ctx = multiprocessing.get_context("fork")
    feed, channel, sub = _subscribed(namespace, "hundred", 4096)
    with ctx.Pool(100) as pool:
        results = pool.starmap(W.publish, [(namespace, "hundred", i) for i in range(1000)], chunksize=1)
    assert results == [1] * 1000
    assert sorted(channel.recv(timeout=5) for _ in range(1000)) == list(range(1000))
    _no_error_within(sub)


# --- 4. objects made before a fork are one object -------------------------------------------


@pytest.mark.timeout(60)
def test_reading_a_new_feed_creates_nothing(namespace: str) -> None:
    feed = shmfeed.Feed()
    assert not feed.closed
    assert feed.statistics().sent == 0
    assert _gc.namespace_entries(namespace) == []
    assert not _registry_client.is_running(namespace)


@pytest.mark.timeout(60)
def test_a_feed_made_before_fork_is_one_feed(namespace: str) -> None:
    ctx = multiprocessing.get_context("fork")
    feed = shmfeed.Feed()  # never used before the fork
    ready, reports = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=W.subscribe_and_report, args=(feed, ready, reports))
    child.start()
    ready.get(timeout=WAIT)
    assert feed.send("hi") == 1
    assert reports.get(timeout=WAIT) == "hi"
    child.join(WAIT)
    assert child.exitcode == 0


@pytest.mark.timeout(60)
def test_a_pool_initializer_feed_made_before_fork_is_one_feed(namespace: str) -> None:
    ctx = multiprocessing.get_context("fork")
    feed = shmfeed.Feed()
    with ctx.Pool(2, initializer=W.keep_feed, initargs=(feed,)) as pool:
        channel = shmfeed.Channel(capacity=64)
        with feed.subscribe(channel):
            assert pool.map(W.send_on_kept_feed, range(10)) == [1] * 10
            assert sorted(channel.recv(timeout=5) for _ in range(10)) == list(range(10))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("closer", ["parent", "child"])
def test_a_scope_made_before_fork_is_one_scope(namespace: str, closer: str) -> None:
    ctx = multiprocessing.get_context("fork")
    scope = shmfeed.SubscriptionScope()
    mine = scope.track(shmfeed.Feed().subscribe(shmfeed.Channel()))
    assert mine is not None
    ready, reports = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=W.track_and_report, args=(scope, ready, reports))
    child.start()
    assert ready.get(timeout=WAIT) == 2  # the parent's and the child's
    if closer == "parent":
        scope.close()
    else:
        other = ctx.Process(target=W.close_scope, args=(scope,))
        other.start()
        other.join(WAIT)
    assert reports.get(timeout=WAIT) == "None"  # the child's subscription ended cleanly
    assert mine.err().recv(timeout=5) is None
    child.join(WAIT)
    assert child.exitcode == 0 and scope.closed


@pytest.mark.timeout(60)
def test_a_mux_made_before_fork_is_one_mux(namespace: str) -> None:
    from _mux_workers import Ping

    ctx = multiprocessing.get_context("fork")
    mux = shmfeed.TypeMux()  # never used before the fork
    go = ctx.Event()
    child = ctx.Process(target=W.post_on_mux, args=(mux, go, Ping(3)))
    child.start()
    sub = mux.subscribe(Ping)
    go.set()
    assert sub.chan().recv(timeout=WAIT).data == Ping(3)
    child.join(WAIT)
    assert child.exitcode == 0
    mux.stop()


# --- 5. never blocked for good --------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_worker_that_raises_inside_its_loop_does_not_block_the_producer(mp_context: Any, namespace: str) -> None:
    feed = shmfeed.Feed("ticks")
    registry_pid(namespace)
    ready = shmfeed.Channel()
    with mp_context.Pool(3) as pool:
        tasks = [pool.apply_async(W.tick_worker, (namespace, "ticks", i, ready, 50 if i == 0 else -1, 1999))
                 for i in range(3)]
        for _ in tasks:
            ready.recv(timeout=WAIT)
        started = time.monotonic()
        for tick in range(2000):
            feed.send(tick)
        producer_seconds = time.monotonic() - started
        with pytest.raises(ValueError, match="gives up at 50"):
            tasks[0].get(timeout=WAIT)
        assert [task.get(timeout=WAIT) for task in tasks[1:]] == [2000, 2000]
    assert producer_seconds < 30


@pytest.mark.timeout(60)
def test_a_channel_dropped_while_subscribed_ends_its_subscription_and_warns(namespace: str) -> None:
    feed = shmfeed.Feed()
    channel = shmfeed.Channel(capacity=1)
    sub = feed.subscribe(channel)
    err = sub.err()
    assert feed.send(1) == 1
    with pytest.warns(ResourceWarning, match="dropped while still subscribed"):
        del channel, sub
        gc.collect()
    assert feed.send(2) == 0  # would block for good on the full ring before
    assert err.recv(timeout=5) is None
    kept = shmfeed.Channel()
    with feed.subscribe(kept):  # a channel still held is not touched
        other = shmfeed.Channel()
        del other
        gc.collect()
        assert feed.send(3) == 1 and kept.recv(timeout=5) == 3


@pytest.mark.timeout(60)
def test_iterating_a_subscription_ends_when_the_feed_closes(namespace: str) -> None:
    feed = shmfeed.Feed()
    channel = shmfeed.Channel(capacity=16)
    sub = feed.subscribe(channel)
    for value in range(5):
        feed.send(value)
    feed.close()
    assert list(sub) == [0, 1, 2, 3, 4]


@pytest.mark.timeout(120)
def test_iterating_a_subscription_raises_once_every_sender_died(mp_context: Any, namespace: str) -> None:
    feed, channel, sub = _subscribed(namespace, "dying", 16)
    reports = shmfeed.Channel()
    child = mp_context.Process(target=W.publish_then_report_and_wait, args=(namespace, "dying", "v", reports))
    child.start()
    pid = reports.recv(timeout=WAIT)
    wait_watched(namespace, pid)
    os.kill(pid, signal.SIGKILL)
    got = []
    with pytest.raises(shmfeed.SenderDiedError):
        for value in sub:
            got.append(value)
    assert got == ["v"]
    child.join(WAIT)


@pytest.mark.timeout(120)
def test_the_monitor_names_the_reader_of_a_full_channel(mp_context: Any, namespace: str) -> None:
    channel = shmfeed.Channel(capacity=4)
    reports = shmfeed.Channel()
    registry_pid(namespace)
    for value in range(4):
        channel.send(value)
    reader = mp_context.Process(target=W.read_some_then_wait, args=(namespace, channel, 2, reports))
    reader.start()
    pid = reports.recv(timeout=WAIT)
    for value in range(2):
        channel.send(value)  # full again
    view = _channel_view(namespace, channel)
    assert view["last_receiver"]["pid"] == pid and view["last_receiver"]["alive"]
    assert view["no_reader_s"] is None
    assert {p["pid"] for p in view["holders"]} == {os.getpid(), pid}
    wait_watched(namespace, pid)
    os.kill(pid, signal.SIGKILL)
    reader.join(WAIT)
    view = wait_until(lambda: (v := _channel_view(namespace, channel))["no_reader_s"] is not None and v,
                      10, "the monitor saying 'no reader'")
    assert view["last_receiver"]["pid"] == pid and not view["last_receiver"]["alive"]
    assert view["fill"] == 4


def _channel_view(namespace: str, channel: shmfeed.Channel) -> dict[str, Any]:
    snapshot = _inspect.snapshot(namespace)
    return next(c for c in snapshot["channels"] if int(c["id"], 16) == channel._channel_id)


def test_a_forked_child_knows_its_own_pid_and_names_its_files_by_it(namespace: str) -> None:
    from shmfeed import _names, _process

    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            ok = _process.pid() == os.getpid() and f"p{os.getpid():x}." in _names.spill_pin_file(namespace, 1)
            os.write(write_end, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"1"
    finally:
        os.close(read_end)
        os.waitpid(child, 0)
    assert _process.pid() == os.getpid()
