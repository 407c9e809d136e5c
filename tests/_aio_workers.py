"""Process targets for ``test_aio.py``: the other side of an asyncio program.

Module-level so that spawn children can import them. Each takes the test's namespace
first, and reports failures on its results channel before re-raising (see ``_workers``).
"""

from __future__ import annotations

import time
from typing import Any

import shmfeed
from _workers import RECV_TIMEOUT, reporting


@reporting
def slow_reader(results: shmfeed.Channel, channel: shmfeed.Channel, stop: Any) -> None:
    """Receive until ``stop`` arrives, a little slowly (so that the sender finds the
    channel full often), then report everything received, in order."""
    got = []
    while True:
        value = channel.recv(timeout=RECV_TIMEOUT)
        if value == stop:
            break
        got.append(value)
        if len(got) % 8 == 0:
            time.sleep(0.001)  # pace, not synchronisation: the sender must meet a full ring
    results.send(("got", got), timeout=RECV_TIMEOUT)


@reporting
def producer(results: shmfeed.Channel, channels: list[shmfeed.Channel], n: int) -> None:
    """Send 0..n-1 to each channel in turn, blocking while it is full, then report."""
    for value in range(n):
        for channel in channels:
            channel.send(value, timeout=RECV_TIMEOUT)
    results.send(("sent", n), timeout=RECV_TIMEOUT)


@reporting
def blocked_feed_sender(results: shmfeed.Channel, feed_name: str, value: int) -> None:
    """Send once on a feed whose subscriber is full: holds the feed's send lock while the
    send waits, until the parent makes room."""
    feed = shmfeed.Feed(feed_name)
    count = feed.send(value, timeout=RECV_TIMEOUT)
    results.send(("sent", count), timeout=RECV_TIMEOUT)


@reporting
def close_feed(results: shmfeed.Channel, feed_name: str) -> None:
    shmfeed.Feed(feed_name).close()
    results.send(("closed", True), timeout=RECV_TIMEOUT)
