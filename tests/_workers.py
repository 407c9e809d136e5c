"""Process targets and value classes for ``test_crossprocess.py``.

Everything here is module-level so that spawn and forkserver children can import it (the
parent pickles a reference to the function; the codec names classes by module.qualname).

Every target takes the test's namespace first and puts it in the environment: a
forkserver child inherits the environment of the forkserver process (started by the
first test that used it), not that of the test, so ``SHMFEED_NAMESPACE`` could be stale.
(conftest restarts the forkserver per test as well; passing the namespace keeps these
targets correct without relying on that.)

Targets report failures on their results channel as ``("error", traceback)`` before
re-raising, so that the parent fails with the child's traceback instead of a timeout.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import os
import threading
import traceback
from typing import Any, Callable, NamedTuple

import shmfeed

RECV_TIMEOUT = 60.0  # children never wait forever, whatever goes wrong in the parent


# --- value classes for the encoding round trip -------------------------------------------


class Color(enum.Enum):
    RED = 1
    GREEN = "green"


@dataclasses.dataclass
class Point:
    x: int
    y: float
    tags: list[str]


class Pair(NamedTuple):
    left: Any
    right: Any


# --- helpers ---------------------------------------------------------------------------------


def enter_namespace(namespace: str) -> None:
    os.environ["SHMFEED_NAMESPACE"] = namespace


def reporting(fn: Callable[..., None]) -> Callable[..., None]:
    """Decorate a target ``fn(namespace, results, ...)``: enter the namespace, report errors."""

    @functools.wraps(fn)
    def wrapper(namespace: str, results: shmfeed.Channel, *args: Any) -> None:
        enter_namespace(namespace)
        try:
            fn(results, *args)
        except BaseException:
            results.send(("error", os.getpid(), traceback.format_exc()), timeout=RECV_TIMEOUT)
            raise

    return wrapper


def _read_until(channel: shmfeed.Channel, sentinel: Any) -> list[Any]:
    values = []
    while True:
        value = channel.recv(timeout=RECV_TIMEOUT)
        if value == sentinel:
            return values
        values.append(value)


def _summary(values: list[int], n: int) -> tuple[int, bool]:
    return len(values), values == list(range(n))


# --- 1. fan-out -------------------------------------------------------------------------------


@reporting
def fanout_given_channel(results: shmfeed.Channel, channel: shmfeed.Channel, n: int) -> None:
    """Read the values of a channel the parent subscribed, until -1."""
    count, in_order = _summary(_read_until(channel, -1), n)
    results.send(("done", os.getpid(), count, in_order))


@reporting
def fanout_self_subscribed(results: shmfeed.Channel, feed_name: str, n: int) -> None:
    """Open the feed by name, subscribe an own channel, say ready, read until -1."""
    feed = shmfeed.Feed(feed_name)
    channel = shmfeed.Channel(capacity=256)
    sub = feed.subscribe(channel)
    results.send(("ready", os.getpid()))
    try:
        count, in_order = _summary(_read_until(channel, -1), n)
    finally:
        sub.unsubscribe()
        channel.close()
    results.send(("done", os.getpid(), count, in_order))


# --- 2. two senders, one total order ------------------------------------------------------------


@reporting
def ordered_sender(results: shmfeed.Channel, feed_name: str, sender_id: int, n: int, go: Any) -> None:
    feed = shmfeed.Feed(feed_name)
    results.send(("ready", sender_id))
    if not go.wait(RECV_TIMEOUT):
        raise TimeoutError("no go from the parent")
    counts = {feed.send((sender_id, seq)) for seq in range(n)}
    results.send(("sent", sender_id, sorted(counts)))


@reporting
def ordered_reader(results: shmfeed.Channel, index: int, channel: shmfeed.Channel, total: int) -> None:
    values = [channel.recv(timeout=RECV_TIMEOUT) for _ in range(total)]
    results.send(("read", index, values))


# --- 3. work queue --------------------------------------------------------------------------------


@reporting
def queue_worker(results: shmfeed.Channel, index: int, queue: shmfeed.Channel) -> None:
    results.send(("ready", index))
    taken = list(queue)  # until closed and drained
    results.send(("taken", index, taken))


# --- 4. pool ---------------------------------------------------------------------------------------

_pool_channel: shmfeed.Channel | None = None
_pool_sub: shmfeed.Subscription | None = None


def pool_init(namespace: str, results: shmfeed.Channel, feed_name: str, n: int) -> None:
    """Pool initializer: subscribe an own channel to the feed; a thread reads n values."""
    global _pool_channel, _pool_sub
    enter_namespace(namespace)
    feed = shmfeed.Feed(feed_name)
    _pool_channel = shmfeed.Channel(capacity=128)
    _pool_sub = feed.subscribe(_pool_channel)
    threading.Thread(target=_pool_reader, args=(results, _pool_channel, n), daemon=True).start()
    results.send(("ready", os.getpid()))


def _pool_reader(results: shmfeed.Channel, channel: shmfeed.Channel, n: int) -> None:
    try:
        values = [channel.recv(timeout=RECV_TIMEOUT) for _ in range(n)]
        results.send(("done", os.getpid(), len(values), values == list(range(n))))
    except BaseException:
        results.send(("error", os.getpid(), traceback.format_exc()))


def pool_task(x: int) -> tuple[int, int, int]:
    """A plain pool task run on whatever worker: its pid, its channel's received count."""
    assert _pool_channel is not None
    return os.getpid(), _pool_channel.statistics().received, x * x


# --- 5. a large value ----------------------------------------------------------------------------------


@reporting
def digest_one(results: shmfeed.Channel, channel: shmfeed.Channel) -> None:
    results.send(("ready", os.getpid()))
    value = channel.recv(timeout=RECV_TIMEOUT)
    results.send(("digest", type(value).__name__, len(value), hashlib.sha256(value).hexdigest()))


# --- 6. echo -----------------------------------------------------------------------------------------


@reporting
def echo(results: shmfeed.Channel, inbox: shmfeed.Channel) -> None:
    """Send back everything received, until the inbox is closed; answer on a received Channel."""
    for value in inbox:
        if type(value) is shmfeed.Channel:
            value.send(("pong", os.getpid()), timeout=RECV_TIMEOUT)
        results.send(value, timeout=RECV_TIMEOUT)
    results.send(("echo-done", os.getpid()))


# --- 7. first value seen ----------------------------------------------------------------------------


@reporting
def first_values(results: shmfeed.Channel, channel: shmfeed.Channel, n: int) -> None:
    results.send(("ready", os.getpid()))
    values = [channel.recv(timeout=RECV_TIMEOUT) for _ in range(n)]
    results.send(("got", values))


# --- 8. idle waiting ----------------------------------------------------------------------------------


@reporting
def block_in_recv(results: shmfeed.Channel, channel: shmfeed.Channel) -> None:
    results.send(("blocking", "recv", os.getpid()))
    value = channel.recv()  # no timeout: the plain blocking wait is what is measured
    results.send(("woke", "recv", value))


@reporting
def block_in_select(results: shmfeed.Channel, a: shmfeed.Channel, b: shmfeed.Channel) -> None:
    results.send(("blocking", "select", os.getpid()))
    channel, value = shmfeed.select(a, b)
    results.send(("woke", "select", "a" if channel == a else "b" if channel == b else "?", value))


# --- 16. many large values, each checked ---------------------------------------------------------------


def large_value(seq: int, size: int) -> bytes:
    """A value whose every byte depends on ``seq``: a stale or torn read shows."""
    return hashlib.shake_256(seq.to_bytes(8, "little")).digest(size)


def large_record(seq: int, size: int) -> dict:
    """A dict around a large bytes member (sent in parts, see _codec.Segments)."""
    return {"seq": seq, "blob": large_value(seq, size), "tail": [seq, "end"]}


@reporting
def check_large_records(results: shmfeed.Channel, channel: shmfeed.Channel, n: int, size: int) -> None:
    results.send(("ready", os.getpid()))
    bad = [seq for seq in range(n) if channel.recv(timeout=RECV_TIMEOUT) != large_record(seq, size)]
    results.send(("checked", os.getpid(), bad))


@reporting
def check_large_values(results: shmfeed.Channel, channel: shmfeed.Channel, n: int, size: int) -> None:
    results.send(("ready", os.getpid()))
    bad = [seq for seq in range(n) if channel.recv(timeout=RECV_TIMEOUT) != large_value(seq, size)]
    results.send(("checked", os.getpid(), bad))


def hold_view(namespace: str, channel: shmfeed.Channel[bytes], report: shmfeed.Channel[int]) -> None:
    """Receive a large value as a view, say how long it is, and hold it until killed."""
    os.environ["SHMFEED_NAMESPACE"] = namespace
    view = channel.recv_view(RECV_TIMEOUT)
    report.send(len(view))
    threading.Event().wait(RECV_TIMEOUT)


def send_many_values(namespace: str, channel: shmfeed.Channel[int], count: int) -> None:
    """Send 0..count-1 on ``channel`` in batches of 100 with send_many."""
    os.environ["SHMFEED_NAMESPACE"] = namespace
    for start in range(0, count, 100):
        channel.send_many(range(start, min(count, start + 100)), timeout=RECV_TIMEOUT)
