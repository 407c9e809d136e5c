"""Subscriptions made of code: ``new_subscription``, ``resubscribe`` and ``join_subscriptions``.

Ports of go-ethereum's ``NewSubscription``, ``Resubscribe``/``ResubscribeErr`` and
``JoinSubscriptions``. Each runs one daemon thread and reports on a ``LocalErrorChannel``;
a thread that must wait for several things at once (a subscription's ``err()`` and "we
were unsubscribed") waits in ``select`` over error channels, so nothing polls.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from ._subscription import ErrorChannel, LocalErrorChannel, Subscription, select

__all__ = ["new_subscription", "resubscribe", "resubscribe_err", "join_subscriptions"]


class QuitEvent(threading.Event):
    """The ``quit`` a producer receives: a ``threading.Event`` that is also selectable.

    ``channel`` is an error channel that closes when the event is set, so a producer can
    wait for data and for its cancellation at once:
    ``shmfeed.select(data_channel, quit.channel)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.channel = LocalErrorChannel()

    def set(self) -> None:
        super().set()
        self.channel.close()


class _ProducerSubscription(Subscription):
    """The subscription ``new_subscription`` returns: one thread running the producer."""

    def __init__(self, producer: Callable[[QuitEvent], object]) -> None:
        self._producer = producer
        self._quit = QuitEvent()
        self._err = LocalErrorChannel()
        self._lock = threading.Lock()
        self._unsubscribed = False
        name = getattr(producer, "__qualname__", type(producer).__name__)
        self._thread = threading.Thread(target=self._run, name=f"shmfeed-producer-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._producer(self._quit)
        except Exception as exc:  # noqa: BLE001 - the producer's failure is the subscription's error
            error = exc
        finally:
            # As geth: the error is reported only if nobody unsubscribed meanwhile.
            with self._lock:
                report = not self._unsubscribed
                self._unsubscribed = True
            if report and error is not None:
                self._err.fail(error)
            self._err.close()

    def err(self) -> ErrorChannel:
        return self._err

    def unsubscribe(self) -> None:
        with self._lock:
            self._unsubscribed = True
        self._quit.set()
        # Wait for the producer to return, unless the producer itself is unsubscribing.
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __repr__(self) -> str:
        state = "ended" if self._err.closed else "running"
        return f"<shmfeed.Subscription producer {self._thread.name[17:]} {state}>"


def new_subscription(producer: Callable[[QuitEvent], object]) -> Subscription:
    """Run ``producer(quit)`` in a new thread, as a subscription (geth's ``NewSubscription``).

    Use it to turn any loop that produces events (into a Channel, a queue, a socket) into a
    ``Subscription`` that can be cancelled, scoped, joined or resubscribed. ``quit`` is a
    ``threading.Event`` set by ``unsubscribe()``; the producer should return soon after.
    It is also selectable: ``quit.channel`` closes when it is set, so a producer may wait
    with ``shmfeed.select(data_channel, quit.channel)``.

    If the producer raises (an ``Exception``), the exception is delivered on ``err()``,
    unless ``unsubscribe()`` was called before; when it returns, ``err()`` closes.

    Args:
        producer: called once, in a new daemon thread, with the quit event.

    Returns:
        The subscription. Its ``unsubscribe()`` sets ``quit`` and waits for the producer to
        return (except when called from the producer itself); it is idempotent and may be
        called from any thread.

    Raises:
        TypeError: ``producer`` is not callable.
    """
    if not callable(producer):
        raise TypeError(
            f"shmfeed: new_subscription needs a callable, got {type(producer).__name__}; pass a function of one "
            f"argument, quit"
        )
    return _ProducerSubscription(producer)


# The backoff's clock and its sleep, looked up at each use so that tests can put a fake
# clock in their place (as _largecopy's tests do with its timer): measured on a loaded
# machine, a wait of 0.02 s cannot be told from one of 0.1 s, so only a fake clock can
# check the exact sequence of waits.
_monotonic: Callable[[], float] = time.monotonic


def _sleep(quit: threading.Event, seconds: float) -> bool:
    """Wait ``seconds``, or less if ``quit`` is set meanwhile; True if it was set."""
    return quit.wait(seconds)


ResubscribeErrFunc = Callable[[threading.Event, Optional[BaseException]], Subscription]
ResubscribeFunc = Callable[[threading.Event], Subscription]


class _ResubscribeSubscription(Subscription):
    """geth's ``resubscribeSub``: one thread that keeps a subscription established."""

    def __init__(self, backoff_max: float, fn: ResubscribeErrFunc) -> None:
        self._fn = fn
        self._backoff_max = backoff_max
        self._wait_time = backoff_max / 10
        self._last_try = 0.0
        self._last_sub_err: BaseException | None = None
        self._err = LocalErrorChannel()
        self._quit = QuitEvent()
        self._lock = threading.Lock()
        self._attempt: threading.Event | None = None  # the ctx of the running fn call
        self._thread = threading.Thread(target=self._loop, name="shmfeed-resubscribe", daemon=True)
        self._thread.start()

    def err(self) -> ErrorChannel:
        return self._err

    def unsubscribe(self) -> None:
        with self._lock:
            self._quit.set()
            if self._attempt is not None:
                self._attempt.set()
        if threading.current_thread() is not self._thread:  # fn may unsubscribe us itself
            self._thread.join()

    def _loop(self) -> None:
        try:
            while True:
                sub = self._subscribe()
                if sub is None:
                    break
                try:
                    done = self._wait_for_error(sub)
                finally:
                    sub.unsubscribe()
                if done:
                    break
        except Exception as exc:  # noqa: BLE001 - a broken fn or subscription ends us visibly
            self._err.fail(exc)
        finally:
            self._err.close()

    def _subscribe(self) -> Subscription | None:
        """Call fn until it returns a subscription (None once unsubscribed)."""
        while True:
            with self._lock:
                ctx = self._attempt = threading.Event()
                if self._quit.is_set():
                    if self._last_try:
                        return None
                    ctx.set()  # as geth, the first attempt is made even if cancelled already
            self._last_try = _monotonic()
            sub: Subscription | None = None
            failed = False
            try:
                sub = self._fn(ctx, self._last_sub_err)
            except Exception:  # noqa: BLE001 - geth: a failed attempt is retried after a backoff
                failed = True
            finally:
                with self._lock:
                    self._attempt = None
                ctx.set()  # geth cancels the attempt's context once fn has returned
            if self._quit.is_set():
                if sub is not None:
                    sub.unsubscribe()  # made while we were being cancelled: not wanted
                return None
            if not failed:
                if sub is None:
                    raise TypeError("event: ResubscribeFunc returned None and raised no error")
                return sub
            if self._backoff_wait():
                return None

    def _wait_for_error(self, sub: Subscription) -> bool:
        """Wait until ``sub`` ends or we are unsubscribed; True if we are done."""
        channel, error = select(sub.err(), self._quit.channel)
        if channel is self._quit.channel:
            return True
        self._last_sub_err = error
        return error is None

    def _backoff_wait(self) -> bool:
        """Sleep before the next try (geth's ``backoffWait``); True if unsubscribed meanwhile."""
        if _monotonic() - self._last_try > self._backoff_max:
            self._wait_time = self._backoff_max / 10
        else:
            self._wait_time = min(self._wait_time * 2, self._backoff_max)
        return _sleep(self._quit, self._wait_time)

    def __repr__(self) -> str:
        state = "ended" if self._err.closed else "running"
        return f"<shmfeed.Subscription resubscribing (backoff_max={self._backoff_max} s) {state}>"


def _check_backoff(backoff_max: float) -> float:
    if not isinstance(backoff_max, (int, float)) or isinstance(backoff_max, bool):
        raise TypeError(f"shmfeed: backoff_max must be a number of seconds, got {type(backoff_max).__name__}; "
                        f"pass an int or a float")
    if not backoff_max >= 0 or backoff_max == float("inf"):
        raise ValueError(f"shmfeed: backoff_max must be a finite number of seconds >= 0, got {backoff_max!r}; "
                         f"pass one such as 1.0")
    return float(backoff_max)


def resubscribe_err(backoff_max: float, fn: ResubscribeErrFunc) -> Subscription:
    """Keep a subscription established, telling ``fn`` why the last one failed.

    As ``resubscribe``, but ``fn(ctx, last_err)`` also receives the error of the previous
    subscription (``None`` on the first call), e.g. to log it (geth's ``ResubscribeErr``).

    Args:
        backoff_max: the longest wait between failed calls of ``fn``, in seconds.
        fn: ``fn(ctx, last_err)`` returns a Subscription or raises.

    Returns:
        A subscription whose ``err()`` closes once the active subscription ends
        successfully or ``unsubscribe()`` was called.

    Raises:
        TypeError: ``backoff_max`` is not a number or ``fn`` is not callable.
        ValueError: ``backoff_max`` is negative, NaN or infinite.
    """
    backoff_max = _check_backoff(backoff_max)
    if not callable(fn):
        raise TypeError(f"shmfeed: resubscribe needs a callable, got {type(fn).__name__}; pass fn(ctx, last_err) "
                        f"returning a Subscription")
    return _ResubscribeSubscription(backoff_max, fn)


def resubscribe(backoff_max: float, fn: ResubscribeFunc) -> Subscription:
    """Keep a subscription established: call ``fn`` again whenever it fails.

    ``fn(ctx)`` establishes a subscription and returns it, or raises. ``ctx`` is a
    ``threading.Event`` set when the attempt is cancelled (by ``unsubscribe()``, or once
    ``fn`` returned); a slow ``fn`` should give up when it is set. While the subscription
    runs, a background thread waits for it to end. When it fails (an error arrives on its
    ``err()``), it is unsubscribed and ``fn`` is called again at once; when ``fn`` raises,
    it is called again after a backoff. This repeats until ``unsubscribe()`` is called or
    the active subscription ends successfully (its ``err()`` closes with no error); then
    the returned subscription's ``err()`` closes. A typical ``fn`` subscribes to a named
    Feed, so that a subscriber outlives the death of the feed's senders
    (``SenderDiedError``) or an eviction (``SlowSubscriberError``).

    The backoff follows geth: the wait starts at ``backoff_max / 10``, doubles with each
    failed call up to ``backoff_max`` (so the first wait after a quick failure is
    ``backoff_max / 5``), and falls back to ``backoff_max / 10`` when the last call began
    more than ``backoff_max`` ago. ``unsubscribe()`` interrupts a wait at once.

    Args:
        backoff_max: the longest wait between failed calls of ``fn``, in seconds.
        fn: ``fn(ctx)`` returns a Subscription or raises.

    Returns:
        A subscription. Its ``unsubscribe()`` cancels a running attempt, unsubscribes the
        active subscription, waits for the background thread and closes ``err()``. If
        ``fn`` returns None without raising, the ``TypeError`` is delivered on ``err()``.

    Raises:
        TypeError: ``backoff_max`` is not a number or ``fn`` is not callable.
        ValueError: ``backoff_max`` is negative, NaN or infinite.
    """
    if not callable(fn):
        raise TypeError(f"shmfeed: resubscribe needs a callable, got {type(fn).__name__}; pass fn(ctx) returning "
                        f"a Subscription")
    return resubscribe_err(backoff_max, lambda ctx, _last_err: fn(ctx))


def join_subscriptions(*subs: Subscription) -> Subscription:
    """One subscription standing for several (geth's ``JoinSubscriptions``).

    The first error of any member is delivered on the joined ``err()`` and every member is
    unsubscribed. A member that ends successfully is simply no longer watched; once every
    member has (or at once when there are none), the joined ``err()`` closes.
    ``unsubscribe()`` unsubscribes every member. One thread waits over the members'
    ``err()`` channels with ``select``.

    Args:
        subs: the member subscriptions; their ``err()`` channels must be selectable
            (``shmfeed`` subscriptions are), and cross-process ones of one namespace.

    Returns:
        The joined subscription.

    Raises:
        TypeError: a member is not a Subscription-like object (no ``err``/``unsubscribe``).
    """
    members = list(subs)
    for sub in members:
        if not (callable(getattr(sub, "err", None)) and callable(getattr(sub, "unsubscribe", None))):
            raise TypeError(f"shmfeed: join_subscriptions takes subscriptions, got {type(sub).__name__}; pass "
                            f"what subscribe() returned")

    def wait_for_members(quit: QuitEvent) -> None:
        try:
            waiting = [sub.err() for sub in members]
            while waiting:
                channel, error = select(*waiting, quit.channel)
                if channel is quit.channel:
                    return
                if error is not None:
                    raise error
                waiting.remove(channel)  # ended successfully: stop watching it
        finally:
            for sub in members:
                sub.unsubscribe()

    wait_for_members.__qualname__ = "join_subscriptions"
    return new_subscription(wait_for_members)


for _public in (new_subscription, resubscribe, resubscribe_err, join_subscriptions):
    _public.__module__ = "shmfeed"
del _public
