"""Process targets of ``test_lifecycle.py`` (module level: spawn and forkserver import them).

Each takes the namespace first: a forkserver child inherits the forkserver's environment,
not the test's.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import shmfeed
from _workers import enter_namespace

RECV_TIMEOUT = 60.0

_pool_feed: shmfeed.Feed | None = None


def publish(namespace: str, feed_name: str, value: Any) -> int:
    """A pool task: send one value on a named feed, then return (the worker lives on)."""
    enter_namespace(namespace)
    return shmfeed.Feed(feed_name).send(value)


def publish_then_report_and_wait(namespace: str, feed_name: str, value: Any, reports: Any) -> None:
    """A pool task: send one value, report our pid, then wait to be killed (still a sender:
    the Feed object is kept; dropping it would detach this process from the feed)."""
    enter_namespace(namespace)
    feed = shmfeed.Feed(feed_name)
    feed.send(value)
    reports.send(os.getpid())
    signal.pause()


def keep_feed(feed: shmfeed.Feed) -> None:
    """Pool initializer: keep the Feed made before the fork."""
    global _pool_feed
    _pool_feed = feed


def send_on_kept_feed(value: Any) -> int:
    assert _pool_feed is not None
    return _pool_feed.send(value)


def send_then_wait(namespace: str, feed_name: str, values: list[Any], sent: Any, go: Any) -> None:
    """Send ``values[0]``, say so, wait for ``go``, then send the rest."""
    enter_namespace(namespace)
    feed = shmfeed.Feed(feed_name)
    feed.send(values[0])
    sent.put(os.getpid())
    if len(values) > 1:
        go.wait(RECV_TIMEOUT)
        for value in values[1:]:
            feed.send(value)


def subscribe_and_report(feed: shmfeed.Feed, ready: Any, reports: Any) -> None:
    """(fork) Subscribe a new channel to an inherited feed, say ready, report what arrives."""
    channel = shmfeed.Channel(capacity=8)
    with feed.subscribe(channel):
        ready.put(os.getpid())
        reports.put(channel.recv(timeout=RECV_TIMEOUT))


def track_and_report(scope: shmfeed.SubscriptionScope, ready: Any, reports: Any) -> None:
    """(fork) Track a subscription in an inherited scope; report how it ended."""
    sub = scope.track(shmfeed.Feed().subscribe(shmfeed.Channel()))
    assert sub is not None
    ready.put(scope.count())
    reports.put(repr(sub.err().recv(timeout=RECV_TIMEOUT)))


def close_scope(scope: shmfeed.SubscriptionScope) -> None:
    """(fork) Close an inherited scope."""
    scope.close()


def post_on_mux(mux: shmfeed.TypeMux, go: Any, value: Any) -> None:
    """(fork) Wait for ``go``, then post ``value`` on an inherited mux."""
    go.wait(RECV_TIMEOUT)
    mux.post(value)


def tick_worker(namespace: str, feed_name: str, index: int, ready: Any, raise_at: int, last: int) -> int:
    """A pool task: read ticks from a fresh subscribed channel with ``for v in ch``; raise at
    ``raise_at`` (leaving the channel and the subscription behind, unclosed)."""
    enter_namespace(namespace)
    channel = shmfeed.Channel(capacity=8)
    sub = shmfeed.Feed(feed_name).subscribe(channel)  # noqa: F841 - kept as users do
    ready.send(index)
    count = 0
    for value in channel:
        count += 1
        if value == raise_at:
            raise ValueError(f"worker {index} gives up at {value}")
        if value == last:
            break
    return count


def read_some_then_wait(namespace: str, channel: shmfeed.Channel, n: int, reports: Any) -> None:
    """Receive ``n`` values, report our pid, then wait to be killed (holding the channel)."""
    enter_namespace(namespace)
    for _ in range(n):
        channel.recv(timeout=RECV_TIMEOUT)
    reports.send(os.getpid())
    signal.pause()


def send_in_block_then_wait(namespace: str, feed_name: str, value: Any, reports: shmfeed.Channel) -> None:
    """Send inside a ``with Feed(...)`` block, report our pid after it, wait to be killed."""
    enter_namespace(namespace)
    with shmfeed.Feed(feed_name) as feed:
        feed.send(value)
    reports.send(os.getpid())
    signal.pause()
