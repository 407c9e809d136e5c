"""Process targets and event classes for ``test_typemux.py`` and ``test_resubscribe.py``.

Module-level so that spawn and forkserver children can import them, and so that the codec
can name the event classes (``_mux_workers.Ping``) in every process. Every target takes
the test's namespace first, enters it, and reports a failure on its results channel as
``("error", pid, traceback)`` before re-raising (see ``_workers``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import traceback
from typing import Any, Callable

import shmfeed

RECV_TIMEOUT = 60.0  # children never wait forever, whatever goes wrong in the parent


@dataclasses.dataclass(frozen=True)
class Ping:
    n: int


@dataclasses.dataclass(frozen=True)
class Pong:
    text: str


@dataclasses.dataclass(frozen=True)
class PingChild(Ping):
    """A subclass: a mux routes by exact type, so it is not a Ping for subscribers."""


def reporting(fn: Callable[..., None]) -> Callable[..., None]:
    """Decorate a target ``fn(results, ...)``: enter the namespace, report errors."""

    @functools.wraps(fn)
    def wrapper(namespace: str, results: shmfeed.Channel, *args: Any) -> None:
        os.environ["SHMFEED_NAMESPACE"] = namespace
        try:
            fn(results, *args)
        except BaseException:
            results.send(("error", os.getpid(), traceback.format_exc()), timeout=RECV_TIMEOUT)
            raise

    return wrapper


# --- resubscribe across processes -----------------------------------------------------------


@reporting
def send_values(results: shmfeed.Channel, feed_name: str, values: list[int], close: bool) -> None:
    """Send ``values`` on the named feed, report ("sent", pid); then close it and exit, or
    wait to be killed (so that the registry sees the feed's only sender die)."""
    feed = shmfeed.Feed(feed_name)
    for value in values:
        feed.send(value)
    if close:
        feed.close()
    results.send(("sent", os.getpid()), timeout=RECV_TIMEOUT)
    if not close:
        while True:
            signal.pause()


# --- a named TypeMux across processes ---------------------------------------------------------


@reporting
def mux_poster(results: shmfeed.Channel, mux_name: str, n: int, go: shmfeed.Channel) -> None:
    """Post Ping(0..n-1) and Pong("done") on the named mux when told to; once told that the
    mux was stopped (by the parent), check that a post raises MuxClosedError."""
    mux = shmfeed.TypeMux(mux_name)
    results.send("ready", timeout=RECV_TIMEOUT)
    assert go.recv(timeout=RECV_TIMEOUT) == "post"
    for i in range(n):
        mux.post(Ping(i))
    mux.post(Pong("done"))
    results.send("posted", timeout=RECV_TIMEOUT)
    assert go.recv(timeout=RECV_TIMEOUT) == "stopped"
    try:
        mux.post(Ping(-1))
    except shmfeed.MuxClosedError as error:
        results.send(("closed", str(error)), timeout=RECV_TIMEOUT)
    else:
        results.send(("not closed", None), timeout=RECV_TIMEOUT)


@reporting
def mux_subscriber(results: shmfeed.Channel, mux_name: str) -> None:
    """Subscribe to Ping on the named mux, read until the parent's stop() closes the channel,
    report what arrived (in order) and that the subscription is closed."""
    mux = shmfeed.TypeMux(mux_name)
    sub = mux.subscribe(Ping)
    results.send("subscribed", timeout=RECV_TIMEOUT)
    received = []
    while True:
        try:
            event = sub.chan().recv(timeout=RECV_TIMEOUT)
        except shmfeed.ChannelClosed:
            break
        assert event.time.tzinfo is not None
        received.append(event.data.n)
    results.send(("done", received, bool(sub.closed)), timeout=RECV_TIMEOUT)
    try:
        mux.post(Ping(-1))
    except shmfeed.MuxClosedError:
        results.send("post refused", timeout=RECV_TIMEOUT)
