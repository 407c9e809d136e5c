"""new_subscription, resubscribe, resubscribe_err and join_subscriptions.

Ports of go-ethereum's ``event/subscription_test.go`` and ``event/multisub_test.go``, then
the backoff's exact sequence of waits (on a fake clock: on a loaded machine a measured wait
cannot tell a backoff of 0.02 s from one of 0.1 s), then resubscribing across a sender
process that is killed and restarted.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from typing import Any

import pytest

import _mux_workers as W
import shmfeed
from shmfeed import _resubscribe

WAIT = 10.0  # generous bound for anything that should happen "at once"


class FakeClock:
    """The backoff's clock and sleep (``_resubscribe._monotonic``, ``_sleep``): time moves
    only when the backoff sleeps (each wait is recorded) or a test's fn says it took time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        self.waits: list[float] = []
        monkeypatch.setattr(_resubscribe, "_monotonic", lambda: self.now)
        monkeypatch.setattr(_resubscribe, "_sleep", self.sleep)

    def sleep(self, quit: threading.Event, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return quit.is_set()

    def take(self, seconds: float) -> None:
        """The call being made lasts ``seconds``."""
        self.now += seconds


def _gaps(calls: list[tuple[float, float]]) -> list[float]:
    """Time from the end of each call of fn to the start of the next."""
    return [next_start - end for (_, end), (next_start, _) in zip(calls, calls[1:])]


class IntsError(Exception):
    """geth's errInts."""


ERR_INTS = IntsError("error in subscribeInts")


def subscribe_ints(maximum: int, fail: int, channel: shmfeed.Channel) -> shmfeed.Subscription:
    def producer(quit: threading.Event) -> None:
        for i in range(maximum):
            if i >= fail:
                raise ERR_INTS
            if quit.is_set():
                return
            channel.send(i, timeout=WAIT)

    return shmfeed.new_subscription(producer)


def _ended_ok(sub: shmfeed.Subscription) -> bool:
    return sub.err().recv(timeout=WAIT) is None


# --- new_subscription ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_new_subscription_error():
    channel = shmfeed.Channel(capacity=16)
    sub = subscribe_ints(10, 2, channel)
    received: list[int] = []
    while True:
        source, value = shmfeed.select(channel, sub.err(), timeout=WAIT)
        if source is channel:
            received.append(value)
            continue
        assert value is ERR_INTS
        break
    while len(channel):  # the error was raised after 0 and 1 were sent
        received.append(channel.recv(0))
    assert received == [0, 1]
    sub.unsubscribe()
    assert sub.err().recv(timeout=0) is None, "channel still open after unsubscribe"
    channel.close()


@pytest.mark.timeout(30)
def test_new_subscription_unsubscribe_waits_for_the_producer():
    started, finished = threading.Event(), threading.Event()

    def producer(quit: threading.Event) -> None:
        started.set()
        quit.wait()
        finished.set()
        raise RuntimeError("after unsubscribe: not reported")

    sub = shmfeed.new_subscription(producer)
    assert started.wait(WAIT)
    with pytest.raises(TimeoutError):
        sub.err().recv(timeout=0)
    sub.unsubscribe()
    assert finished.is_set()
    assert sub.err().recv(timeout=0) is None
    sub.unsubscribe()  # idempotent


@pytest.mark.timeout(30)
def test_new_subscription_returning_closes_err():
    sub = shmfeed.new_subscription(lambda quit: None)
    assert _ended_ok(sub)
    assert not sub.statistics().active
    sub.unsubscribe()


@pytest.mark.timeout(30)
def test_new_subscription_quit_is_selectable():
    data = shmfeed.Channel(capacity=4)
    seen: list[Any] = []

    def producer(quit: Any) -> None:
        while True:
            source, value = shmfeed.select(data, quit.channel)
            if source is quit.channel:
                return
            seen.append(value)

    sub = shmfeed.new_subscription(producer)
    data.send("x")
    sub.unsubscribe()
    assert seen in (["x"], [])  # whichever select took first; it returned either way
    data.close()


@pytest.mark.timeout(30)
def test_new_subscription_unsubscribe_from_the_producer_and_from_many_threads():
    holder: list[shmfeed.Subscription] = []
    ready = threading.Event()

    def producer(quit: threading.Event) -> None:
        ready.wait()
        holder[0].unsubscribe()  # must not wait for itself
        assert quit.is_set()

    sub = shmfeed.new_subscription(producer)
    holder.append(sub)
    ready.set()
    assert _ended_ok(sub)

    sub = shmfeed.new_subscription(lambda quit: quit.wait())
    threads = [threading.Thread(target=sub.unsubscribe) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert sub.err().recv(timeout=0) is None


def test_new_subscription_needs_a_callable():
    with pytest.raises(TypeError):
        shmfeed.new_subscription(42)  # type: ignore[arg-type]


# --- resubscribe (geth's tests) ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_resubscribe(monkeypatch):
    clock = FakeClock(monkeypatch)
    calls: list[tuple[float, float]] = []  # (start, end) of each call of fn
    nfails = 6

    def fn(ctx: threading.Event) -> shmfeed.Subscription:
        start = clock.now
        i = len(calls) + 1
        if i == 2:
            clock.take(0.2)  # delay the second failure a bit to reset the backoff
        calls.append((start, clock.now))
        if i < nfails:
            raise RuntimeError("oops")
        return shmfeed.new_subscription(lambda unsubscribed: None)

    sub = shmfeed.resubscribe(0.1, fn)
    assert _ended_ok(sub)
    assert len(calls) == nfails
    # geth's schedule: 0.02 (doubled from 0.01), then reset to 0.01 after the slow call,
    # then 0.02, 0.04, 0.08; and nothing but these waits between the calls.
    assert clock.waits == pytest.approx([0.02, 0.01, 0.02, 0.04, 0.08])
    assert _gaps(calls) == pytest.approx(clock.waits)
    sub.unsubscribe()


@pytest.mark.timeout(30)
def test_resubscribe_abort():
    done: queue.Queue[str | None] = queue.Queue()

    def fn(ctx: threading.Event) -> Any:
        done.put(None if ctx.wait(2.0) else "context given to resubscribe function not cancelled within 2 s")
        return None

    sub = shmfeed.resubscribe(0, fn)
    sub.unsubscribe()
    assert done.get(timeout=WAIT) is None
    assert sub.err().recv(timeout=0) is None


@pytest.mark.timeout(30)
def test_resubscribe_with_error_handler():
    nfails = 6
    sub_errs: list[str] = []

    def fn(ctx: threading.Event, last_err: BaseException | None) -> shmfeed.Subscription:
        i = len(sub_errs) + 1
        sub_errs.append("" if last_err is None else str(last_err))

        def producer(unsubscribed: threading.Event) -> None:
            if i < nfails:
                raise RuntimeError(f"err-{i}")

        return shmfeed.new_subscription(producer)

    sub = shmfeed.resubscribe_err(0.1, fn)
    assert _ended_ok(sub)
    assert sub_errs == ["", "err-1", "err-2", "err-3", "err-4", "err-5"]
    sub.unsubscribe()


@pytest.mark.timeout(30)
def test_resubscribe_with_completed_subscription():
    quit_producer = shmfeed._subscription.LocalErrorChannel()
    quit_producer_ack: queue.Queue[bool] = queue.Queue()

    def fn(ctx: threading.Event, last_err: BaseException | None) -> shmfeed.Subscription:
        def producer(unsubscribed: Any) -> None:
            source, _ = shmfeed.select(quit_producer, unsubscribed.channel)
            if source is quit_producer:
                quit_producer_ack.put(True)

        return shmfeed.new_subscription(producer)

    sub = shmfeed.resubscribe_err(0.1, fn)
    quit_producer.close()  # the producer has started and exits before unsubscribe
    assert quit_producer_ack.get(timeout=WAIT)
    sub.unsubscribe()  # must not deadlock
    assert sub.err().recv(timeout=0) is None


# --- resubscribe: more -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_backoff_doubles_up_to_the_maximum(monkeypatch):
    clock = FakeClock(monkeypatch)
    calls: list[tuple[float, float]] = []

    def fn(ctx: threading.Event) -> shmfeed.Subscription:
        calls.append((clock.now, clock.now))
        if len(calls) < 8:
            raise ConnectionError("down")
        return shmfeed.new_subscription(lambda quit: None)

    sub = shmfeed.resubscribe(0.2, fn)
    assert _ended_ok(sub)
    assert clock.waits == pytest.approx([0.04, 0.08, 0.16, 0.2, 0.2, 0.2, 0.2])
    assert _gaps(calls) == pytest.approx(clock.waits)
    sub.unsubscribe()


@pytest.mark.timeout(30)
def test_backoff_resets_after_a_quiet_period(monkeypatch):
    clock = FakeClock(monkeypatch)
    calls: list[tuple[float, float]] = []

    def fn(ctx: threading.Event) -> shmfeed.Subscription:
        start = clock.now
        if len(calls) == 2:
            clock.take(1.05)  # this try began more than backoff_max before its failure
        calls.append((start, clock.now))
        if len(calls) < 4:
            raise ConnectionError("down")
        return shmfeed.new_subscription(lambda quit: None)

    sub = shmfeed.resubscribe(1.0, fn)
    assert _ended_ok(sub)
    # 0.2, 0.4, then back to 0.1 (without the reset it would have been 0.8).
    assert clock.waits == pytest.approx([0.2, 0.4, 0.1])
    assert _gaps(calls) == pytest.approx(clock.waits)
    sub.unsubscribe()


@pytest.mark.timeout(30)
def test_unsubscribe_interrupts_the_backoff():
    called = threading.Event()

    def fn(ctx: threading.Event) -> shmfeed.Subscription:
        called.set()
        raise ConnectionError("down")

    sub = shmfeed.resubscribe(60.0, fn)  # the first wait is 12 s
    assert called.wait(WAIT)
    start = time.monotonic()
    sub.unsubscribe()
    assert time.monotonic() - start < 5.0
    assert sub.err().recv(timeout=0) is None


@pytest.mark.timeout(30)
def test_unsubscribe_ends_the_active_subscription():
    inner_ended = threading.Event()
    established = threading.Event()

    def fn(ctx: threading.Event) -> shmfeed.Subscription:
        def producer(quit: threading.Event) -> None:
            established.set()
            quit.wait()
            inner_ended.set()

        return shmfeed.new_subscription(producer)

    sub = shmfeed.resubscribe(0.1, fn)
    assert established.wait(WAIT)
    with pytest.raises(TimeoutError):
        sub.err().recv(timeout=0)
    assert sub.statistics().active
    sub.unsubscribe()
    assert inner_ended.is_set()
    assert sub.err().recv(timeout=0) is None
    sub.unsubscribe()


@pytest.mark.timeout(30)
def test_unsubscribe_from_inside_fn():
    holder: list[shmfeed.Subscription] = []
    made: list[shmfeed.Subscription] = []
    go = threading.Event()

    def fn(ctx: threading.Event) -> shmfeed.Subscription:
        go.wait()
        holder[0].unsubscribe()  # must not wait for itself
        assert ctx.is_set()
        inner = shmfeed.new_subscription(lambda quit: quit.wait())
        made.append(inner)
        return inner

    sub = shmfeed.resubscribe(0.1, fn)
    holder.append(sub)
    go.set()
    assert _ended_ok(sub)
    assert made[0].err().recv(timeout=WAIT) is None, "the unwanted subscription was not ended"


@pytest.mark.timeout(30)
def test_fn_returning_none_is_reported():
    sub = shmfeed.resubscribe(0.1, lambda ctx: None)  # type: ignore[arg-type,return-value]
    error = sub.err().recv(timeout=WAIT)
    assert isinstance(error, TypeError)
    assert sub.err().recv(timeout=0) is None
    sub.unsubscribe()


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        shmfeed.resubscribe(-1, lambda ctx: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError):
        shmfeed.resubscribe(float("nan"), lambda ctx: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError):
        shmfeed.resubscribe("1", lambda ctx: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError):
        shmfeed.resubscribe_err(1, None)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_resubscribe_repairs_an_evicted_subscription():
    feed = shmfeed.Feed()
    channel = shmfeed.Channel(capacity=1, overflow="evict")
    errors: queue.Queue[BaseException | None] = queue.Queue()

    def fn(ctx: threading.Event, last_err: BaseException | None) -> shmfeed.Subscription:
        inner = feed.subscribe(channel)
        errors.put(last_err)  # after subscribing: once the test sees it, the subscription is in place
        return inner

    sub = shmfeed.resubscribe_err(0.1, fn)
    assert errors.get(timeout=WAIT) is None
    assert feed.send(1) == 1
    assert feed.send(2) == 0  # full: the subscription is evicted
    assert isinstance(errors.get(timeout=WAIT), shmfeed.SlowSubscriberError)
    assert channel.recv(timeout=0) == 1
    assert feed.send(3) == 1
    assert channel.recv(timeout=WAIT) == 3
    feed.close()  # the active subscription ends successfully
    assert _ended_ok(sub)
    sub.unsubscribe()
    channel.close()


# --- join_subscriptions (geth's multisub tests) ---------------------------------------------------


def _no_value(channel: shmfeed.Channel) -> bool:
    try:
        channel.recv(timeout=0)
    except TimeoutError:
        return True
    return False


@pytest.mark.timeout(30)
def test_multisub():
    feed1, feed2 = shmfeed.Feed(), shmfeed.Feed()
    sink1, sink2 = shmfeed.Channel(capacity=1), shmfeed.Channel(capacity=1)
    sub = shmfeed.join_subscriptions(feed1.subscribe(sink1), feed2.subscribe(sink2))
    feed1.send(1)
    assert sink1.recv(timeout=0) == 1
    feed2.send(2)
    assert sink2.recv(timeout=0) == 2
    sub.unsubscribe()
    assert sub.err().recv(timeout=WAIT) is None, "multisub didn't propagate closure"
    assert feed1.send(11) == 0 and _no_value(sink1)
    assert feed2.send(22) == 0 and _no_value(sink2)
    sink1.close()
    sink2.close()


@pytest.mark.timeout(30)
def test_multisub_partial_unsubscribe():
    feed1, feed2 = shmfeed.Feed(), shmfeed.Feed()
    sink1, sink2 = shmfeed.Channel(capacity=1), shmfeed.Channel(capacity=1)
    sub1, sub2 = feed1.subscribe(sink1), feed2.subscribe(sink2)
    sub = shmfeed.join_subscriptions(sub1, sub2)
    sub1.unsubscribe()
    with pytest.raises(TimeoutError):  # "multisub propagated closure"
        sub.err().recv(timeout=0.05)
    assert feed1.send(1) == 0 and _no_value(sink1)
    feed2.send(2)
    assert sink2.recv(timeout=0) == 2
    sub.unsubscribe()
    assert sub.err().recv(timeout=WAIT) is None
    assert feed1.send(11) == 0 and _no_value(sink1)
    assert feed2.send(22) == 0 and _no_value(sink2)
    sink1.close()
    sink2.close()


@pytest.mark.timeout(30)
def test_multisub_full_unsubscribe():
    feed1, feed2 = shmfeed.Feed(), shmfeed.Feed()
    sink1, sink2 = shmfeed.Channel(capacity=1), shmfeed.Channel(capacity=1)
    sub = shmfeed.join_subscriptions(feed1.subscribe(sink1), feed2.subscribe(sink2))
    sub.unsubscribe()
    assert sub.err().recv(timeout=WAIT) is None
    assert feed1.send(1) == 0 and _no_value(sink1)
    assert feed2.send(2) == 0 and _no_value(sink2)
    sink1.close()
    sink2.close()


@pytest.mark.timeout(30)
def test_join_delivers_the_first_error_and_ends_every_member():
    other_ended = threading.Event()
    fail = threading.Event()

    def failing(quit: threading.Event) -> None:
        fail.wait()
        raise ConnectionError("member failed")

    def waiting(quit: threading.Event) -> None:
        quit.wait()
        other_ended.set()

    sub = shmfeed.join_subscriptions(shmfeed.new_subscription(failing), shmfeed.new_subscription(waiting))
    fail.set()
    error = sub.err().recv(timeout=WAIT)
    assert isinstance(error, ConnectionError) and str(error) == "member failed"
    assert other_ended.wait(WAIT)
    assert sub.err().recv(timeout=0) is None
    sub.unsubscribe()


@pytest.mark.timeout(30)
def test_join_ends_successfully_when_every_member_does():
    feed1, feed2 = shmfeed.Feed(), shmfeed.Feed()
    sink = shmfeed.Channel(capacity=4)
    sub = shmfeed.join_subscriptions(feed1.subscribe(sink), feed2.subscribe(sink))
    feed1.close()
    with pytest.raises(TimeoutError):
        sub.err().recv(timeout=0.05)
    feed2.close()
    assert sub.err().recv(timeout=WAIT) is None
    sub.unsubscribe()
    assert _ended_ok(shmfeed.join_subscriptions())
    with pytest.raises(TypeError):
        shmfeed.join_subscriptions(object())  # type: ignore[arg-type]
    sink.close()


# --- across processes: the feed's only sender is killed, then restarted -------------------------


def _report(results: shmfeed.Channel) -> Any:
    message = results.recv(timeout=60)
    if isinstance(message, tuple) and message and message[0] == "error":
        pytest.fail(f"child {message[1]} failed:\n{message[2]}")
    return message


@pytest.mark.timeout(120)
def test_resubscribe_survives_a_killed_sender(mp_context, namespace):
    feed = shmfeed.Feed("prices")
    channel, results = shmfeed.Channel(capacity=64), shmfeed.Channel()
    attempts: queue.Queue[BaseException | None] = queue.Queue()

    def fn(ctx: threading.Event, last_err: BaseException | None) -> shmfeed.Subscription:
        inner = feed.subscribe(channel)
        attempts.put(last_err)
        return inner

    sub = shmfeed.resubscribe_err(0.2, fn)
    processes = []
    try:
        assert attempts.get(timeout=WAIT) is None  # subscribed before anyone sends
        first = mp_context.Process(target=W.send_values, args=(namespace, results, "prices", [1, 2, 3], False))
        processes.append(first)
        first.start()
        assert _report(results) == ("sent", first.pid)
        assert [channel.recv(timeout=WAIT) for _ in range(3)] == [1, 2, 3]

        os.kill(first.pid, signal.SIGKILL)  # the feed's only sender dies without closing it
        first.join(WAIT)
        last_err = attempts.get(timeout=60)  # the registry fails the subscription; fn runs again
        assert isinstance(last_err, shmfeed.SenderDiedError), last_err

        second = mp_context.Process(target=W.send_values, args=(namespace, results, "prices", [4, 5, 6], True))
        processes.append(second)
        second.start()
        assert _report(results) == ("sent", second.pid)
        assert [channel.recv(timeout=WAIT) for _ in range(3)] == [4, 5, 6]
        second.join(WAIT)
        assert second.exitcode == 0
        # The restarted sender closed the feed: the subscription ended successfully.
        assert sub.err().recv(timeout=WAIT) is None
        assert attempts.empty()
    finally:
        sub.unsubscribe()
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        channel.close()
        results.close()
