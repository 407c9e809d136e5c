"""Bad input, catalogued (issue 7): every public name of ``shmfeed.__all__`` given wrong types,
closed objects, invalid names, bad timeouts, huge values. Each gets a clear exception (its
type, and a message saying what is wrong), and shared state stays usable: after each case a
valid round trip through a feed and a channel still works."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from typing import Any, Callable

import psutil
import pytest

import shmfeed

NAN = float("nan")


@dataclasses.dataclass
class Point:
    x: int


class Plain:
    pass


def _closed_channel() -> shmfeed.Channel:
    channel = shmfeed.Channel()
    channel.close()
    return channel


def _closed_feed() -> shmfeed.Feed:
    feed = shmfeed.Feed()
    feed.close()
    return feed


def _stopped_mux() -> shmfeed.TypeMux:
    mux = shmfeed.TypeMux()
    mux.stop()
    return mux


def _int_feed() -> shmfeed.Feed:
    feed = shmfeed.Feed()
    feed.send(1)
    return feed


# (label, call, expected exception type, regex the message must match)
def _loan_sent_twice() -> None:
    feed = shmfeed.Feed()
    try:
        loan = feed.loan(8)
        loan.send()
        loan.send()
    finally:
        feed.close()


CASES: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    # Channel construction
    ("Channel(capacity=0)", lambda: shmfeed.Channel(capacity=0), ValueError, "capacity must be an int >= 1"),
    ("Channel(capacity=-5)", lambda: shmfeed.Channel(capacity=-5), ValueError, "capacity must be an int >= 1"),
    ("Channel(capacity='x')", lambda: shmfeed.Channel(capacity="x"), (TypeError, ValueError), "capacity must be an int"),
    ("Channel(capacity=1.5)", lambda: shmfeed.Channel(capacity=1.5), (TypeError, ValueError), "capacity must be an int"),
    ("Channel(capacity=True)", lambda: shmfeed.Channel(capacity=True), (TypeError, ValueError), "capacity must be an int"),
    ("Channel(elem_type='int')", lambda: shmfeed.Channel("int"), TypeError, "must be a type .*, an int .* or None"),
    ("Channel(3, capacity=3)", lambda: shmfeed.Channel(3, capacity=3), TypeError, "capacity twice"),
    ("Channel(True)", lambda: shmfeed.Channel(True), TypeError, "must be a type"),
    ("Channel(0)", lambda: shmfeed.Channel(0), ValueError, "capacity must be an int >= 1"),
    ("Channel(name='')", lambda: shmfeed.Channel(name=""), ValueError, "channel name must have 1 to 128"),
    ("Channel(name=b'x')", lambda: shmfeed.Channel(name=b"x"), TypeError, "channel name must be a str"),
    ("Channel(buffer_size=-1)", lambda: shmfeed.Channel(buffer_size=-1), ValueError, "buffer_size must be an int >="),
    ("Channel(buffer_size='big')", lambda: shmfeed.Channel(buffer_size="big"), (TypeError, ValueError), "buffer_size"),
    ("Channel(overflow='sometimes')", lambda: shmfeed.Channel(overflow="sometimes"), ValueError,
     "overflow must be one of block, drop_newest, drop_oldest, evict"),
    # Channel timeouts and values
    ("recv(timeout=nan)", lambda: shmfeed.Channel().recv(timeout=NAN), ValueError, "timeout must not be NaN"),
    ("recv(timeout='1')", lambda: shmfeed.Channel().recv(timeout="1"), TypeError, "timeout must be a number or None, got str"),
    ("recv(timeout=-1) empty", lambda: shmfeed.Channel().recv(timeout=-1), TimeoutError, "nothing"),
    ("send(timeout=nan)", lambda: shmfeed.Channel().send(1, timeout=NAN), ValueError, "timeout must not be NaN"),
    ("send(timeout=[1])", lambda: shmfeed.Channel().send(1, timeout=[1]), TypeError, "timeout must be a number"),
    ("send(timeout=-1) full", lambda: _full_channel().send(2, timeout=-1), TimeoutError, "stayed full"),
    ("send(unencodable)", lambda: shmfeed.Channel().send(object()), shmfeed.EncodingError,
     "cannot encode value: type builtins.object is not one shmfeed encodes.*register_type"),
    ("send(nested unencodable)", lambda: shmfeed.Channel().send({"a": [1, Plain()]}), TypeError,
     r'cannot encode value\["a"\]\[1\]: type .*Plain'),
    ("send(int subclass)", lambda: shmfeed.Channel().send(_Int(3)), TypeError, "cannot encode"),
    ("Channel[int].send('x')", lambda: shmfeed.Channel[int]().send("x"), shmfeed.FeedTypeError,
     "event: wrong type in Send got str, want int"),
    ("Channel(int).send(True)", lambda: shmfeed.Channel(int).send(True), shmfeed.FeedTypeError,
     "wrong type in Send got bool, want int"),
    ("closed channel send", lambda: _closed_channel().send(1), shmfeed.ChannelClosed, "send on closed channel"),
    ("closed channel recv", lambda: _closed_channel().recv(timeout=0), shmfeed.ChannelClosed, "is closed"),
    ("closed channel recv (blocking)", lambda: _closed_channel().recv(), shmfeed.ChannelClosed, "is closed"),
    # Feed
    ("Feed('')", lambda: shmfeed.Feed(""), ValueError, "feed name must have 1 to"),
    ("Feed('x' * 10_000)", lambda: shmfeed.Feed("x" * 10_000), ValueError, "feed name must have 1 to .* got 10000"),
    ("Feed(42)", lambda: shmfeed.Feed(42), TypeError, "feed name must be a str, got int"),
    ("Feed(b'prices')", lambda: shmfeed.Feed(b"prices"), TypeError, "feed name must be a str, got bytes"),
    ("Feed('a\\x00b')", lambda: shmfeed.Feed("a\x00b"), ValueError, "unprintable"),
    ("Feed('a\\nb')", lambda: shmfeed.Feed("a\nb"), ValueError, "unprintable"),
    ("Feed(elem_type=3)", lambda: shmfeed.Feed(elem_type=3), TypeError, "elem_type must be a type"),
    ("Loan: feed.loan(0)", lambda: shmfeed.Feed().loan(0), ValueError, "loan size must be 1 to"),
    ("Loan: feed.loan('1')", lambda: shmfeed.Feed().loan("1"), TypeError, "loan size must be an int, not str"),
    ("Loan: sent twice", lambda: _loan_sent_twice(), ValueError, "sent or discarded"),
    ("subscribe(non-channel)", lambda: shmfeed.Feed().subscribe([]), TypeError,
     "event: Subscribe argument does not have sendable channel type"),
    ("subscribe(None)", lambda: shmfeed.Feed().subscribe(None), TypeError, "does not have sendable channel type"),
    ("subscribe(error channel)", lambda: shmfeed.Feed().subscribe(shmfeed.Feed().subscribe(shmfeed.Channel()).err()),
     TypeError, "does not have sendable channel type"),
    ("subscribe(mistyped channel)", lambda: _int_feed().subscribe(shmfeed.Channel(str)), shmfeed.FeedTypeError,
     "event: wrong type in Subscribe got str, want int"),
    ("send(wrong type)", lambda: _int_feed().send("x"), shmfeed.FeedTypeError, "event: wrong type in Send got str, want int"),
    ("feed send(unencodable)", lambda: shmfeed.Feed().send(Plain()), shmfeed.EncodingError, "cannot encode"),
    ("closed feed send", lambda: _closed_feed().send(1), shmfeed.FeedClosed, "send on closed feed"),
    ("feed send(timeout=nan)", lambda: shmfeed.Feed().send(1, timeout=NAN), ValueError, "timeout must not be NaN"),
    ("feed send(timeout='1')", lambda: shmfeed.Feed().send(1, timeout="1"), TypeError, "timeout must be a number"),
    ("FeedSendTimeout: feed send(timeout=-1) full", lambda: _send_to_full_feed(-1), shmfeed.FeedSendTimeout,
     r"send timed out after -1 s: delivered to 0 channels, not to [0-9a-f]{16} \(full\)"),
    ("closed feed subscribe", lambda: _closed_feed().subscribe(shmfeed.Channel()), shmfeed.FeedClosed,
     "subscribe to closed feed"),
    # select
    ("select()", lambda: shmfeed.select(), TypeError, "select needs at least one channel"),
    ("select(3)", lambda: shmfeed.select(3), TypeError, "select takes shmfeed channels and error channels, got int"),
    ("select(ch, 'x')", lambda: shmfeed.select(shmfeed.Channel(), "x"), TypeError, "got str"),
    ("select(timeout=nan)", lambda: shmfeed.select(shmfeed.Channel(), timeout=NAN), ValueError, "NaN"),
    ("select(timeout='x')", lambda: shmfeed.select(shmfeed.Channel(), timeout="x"), TypeError, "timeout must be a number"),
    ("select(timeout=0) empty", lambda: shmfeed.select(shmfeed.Channel(), timeout=0), TimeoutError, "."),
    ("select(closed channel)", lambda: shmfeed.select(_closed_channel(), timeout=1), shmfeed.ChannelClosed, "closed"),
    ("select_async(3)", lambda: asyncio.run(shmfeed.select_async(3)), TypeError, "got int"),
    ("select_async(timeout=0) empty", lambda: asyncio.run(shmfeed.select_async(shmfeed.Channel(), timeout=0)),
     TimeoutError, "."),
    ("send_nowait(full): ChannelFull", lambda: _full_channel().send_nowait(2), shmfeed.ChannelFull, "is full"),
    ("recv_nowait(empty): ChannelEmpty", lambda: shmfeed.Channel().recv_nowait(), shmfeed.ChannelEmpty, "is empty"),
    ("send_async(timeout='x')", lambda: asyncio.run(shmfeed.Channel().send_async(1, timeout="x")), TypeError,
     "timeout must be a number"),
    # register_type
    ("register_type(3, ...)", lambda: shmfeed.register_type(3, str, str), TypeError, "cls must be a class, not int"),
    ("register_type(int, ...)", lambda: shmfeed.register_type(int, str, str), TypeError,
     "int is encoded natively by msgpack and cannot be registered"),
    ("register_type(cls, 3, 3)", lambda: shmfeed.register_type(Plain, 3, 3), TypeError, "encode and decode must be callable"),
    # SubscriptionScope
    ("SubscriptionScope('')", lambda: shmfeed.SubscriptionScope(""), ValueError, "scope name must have 1 to"),
    ("SubscriptionScope(7)", lambda: shmfeed.SubscriptionScope(7), TypeError, "scope name must be a str, got int"),
    ("SubscriptionScope('\\x07')", lambda: shmfeed.SubscriptionScope("\x07"), ValueError, "unprintable"),
    ("scope.track(non-subscription)", lambda: shmfeed.SubscriptionScope().track("sub"), TypeError,
     "track takes a Subscription, got str"),
    ("scope.track(channel)", lambda: shmfeed.SubscriptionScope().track(shmfeed.Channel()), TypeError,
     "track takes a Subscription, got Channel"),
    # TypeMux
    ("TypeMux('')", lambda: shmfeed.TypeMux(""), ValueError, "TypeMux name must have 1 to"),
    ("TypeMux(1)", lambda: shmfeed.TypeMux(1), TypeError, "must be a str"),
    ("mux.subscribe(int, int)", lambda: shmfeed.TypeMux().subscribe(int, int), ValueError,
     "event: duplicate type int in Subscribe"),
    ("mux.subscribe(3)", lambda: shmfeed.TypeMux().subscribe(3), TypeError, "TypeMux.subscribe takes types, got 3"),
    ("stopped mux post", lambda: _stopped_mux().post(1), shmfeed.MuxClosedError, "^event: mux closed$"),
    ("TypeMuxEvent()", lambda: shmfeed.TypeMuxEvent(), TypeError, "missing 2 required positional arguments"),
    # new_subscription, resubscribe, join_subscriptions, Subscription
    ("new_subscription(3)", lambda: shmfeed.new_subscription(3), TypeError, "new_subscription needs a callable, got int"),
    ("resubscribe(-1, fn)", lambda: shmfeed.resubscribe(-1, lambda ctx: None), ValueError,
     "backoff_max must be a finite number of seconds >= 0, got -1"),
    ("resubscribe(nan, fn)", lambda: shmfeed.resubscribe(NAN, lambda ctx: None), ValueError, "got nan"),
    ("resubscribe(inf, fn)", lambda: shmfeed.resubscribe(float("inf"), lambda ctx: None), ValueError, "finite"),
    ("resubscribe('1', fn)", lambda: shmfeed.resubscribe("1", lambda ctx: None), TypeError,
     "backoff_max must be a number of seconds, got str"),
    ("resubscribe(1, 3)", lambda: shmfeed.resubscribe(1, 3), TypeError, "resubscribe needs a callable, got int"),
    ("resubscribe_err(1, None)", lambda: shmfeed.resubscribe_err(1, None), TypeError, "needs a callable"),
    ("join_subscriptions(3)", lambda: shmfeed.join_subscriptions(3), TypeError, "join_subscriptions takes subscriptions, got int"),
    ("Subscription()", lambda: shmfeed.Subscription(), TypeError, "abstract"),
    ("set_namespace('')", lambda: shmfeed.set_namespace(""), ValueError, "namespace must have 1 to 200 characters"),
    ("set_namespace(None)", lambda: shmfeed.set_namespace(None), TypeError, "namespace must be a str"),  # type: ignore[arg-type]
    # Bridge (refused before anything is opened or imported: no NATS needed)
    ("Bridge(url, feeds=['a*b'])", lambda: shmfeed.Bridge("nats://127.0.0.1:1", feeds=["a*b"]), ValueError,
     "has a '\\*' before its end"),
    ("Bridge(url, join_timeout=0)", lambda: shmfeed.Bridge("nats://127.0.0.1:1", join_timeout=0), ValueError,
     "join_timeout must be positive"),
    ("Bridge(url, feeds, realm='a.b')", lambda: shmfeed.Bridge("nats://127.0.0.1:1", feeds=["a"], realm="a.b"),
     ValueError, "realm 'a.b' is not a valid realm"),
    ("Bridge(url, feeds=['a', 'a'])", lambda: shmfeed.Bridge("nats://127.0.0.1:1", feeds=["a", "a"]), ValueError,
     "a feed name is given twice"),
    ("Bridge(url, feeds=[''])", lambda: shmfeed.Bridge("nats://127.0.0.1:1", feeds=[""]), ValueError, "feed name"),
]


class _Int(int):
    pass


def _full_channel() -> shmfeed.Channel:
    channel = shmfeed.Channel(capacity=1)
    channel.send(1)
    return channel


def _send_to_full_feed(timeout: float) -> None:
    feed, channel = shmfeed.Feed(), _full_channel()
    with feed.subscribe(channel):
        feed.send(2, timeout=timeout)


def _still_usable() -> None:
    """A valid operation after the bad one: the shared state is fine."""
    feed = shmfeed.Feed("bad-input-after")
    channel = shmfeed.Channel(capacity=4)
    with feed.subscribe(channel):
        assert feed.send({"ok": 1}) == 1
        assert channel.recv(timeout=5) == {"ok": 1}
    channel.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("label, call, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(label: str, call: Callable[[], Any], error: Any, message: str) -> None:
    with pytest.raises(error, match=message):
        call()
    _still_usable()


@pytest.mark.timeout(30)
def test_every_public_name_is_covered() -> None:
    covered = " ".join(c[0] for c in CASES) + " " + " ".join(
        ["ChannelClosed ChannelCorruptError ChannelStatistics EncodingError ErrMuxClosed ErrorChannel FeedClosed",
         "FeedStatistics FeedTypeError MuxClosedError RegistryUnavailableError SenderDiedError ShmfeedError",
         "SlowSubscriberError SubscriptionFailed SubscriptionStatistics TableFullError TypeMuxSubscription",
         "UnknownTypeError BridgeStatistics BridgeFeedStatistics"])
    names = {"Channel": "Channel(", "Feed": "Feed(", "select": "select(", "register_type": "register_type(",
             "SubscriptionScope": "SubscriptionScope(", "TypeMux": "TypeMux(", "TypeMuxEvent": "TypeMuxEvent(",
             "new_subscription": "new_subscription(", "resubscribe": "resubscribe(", "resubscribe_err": "resubscribe_err(",
             "join_subscriptions": "join_subscriptions(", "Subscription": "Subscription(",
             "Bridge": "Bridge("}
    missing = [n for n in shmfeed.__all__ if names.get(n, n) not in covered]
    assert not missing, missing


@pytest.mark.timeout(30)
def test_errors_share_one_root_and_are_exported() -> None:
    for name in ("FeedTypeError", "EncodingError", "ChannelClosed", "FeedClosed", "MuxClosedError",
                 "SlowSubscriberError", "SubscriptionFailed", "SenderDiedError", "RegistryUnavailableError",
                 "ChannelCorruptError", "FeedSendTimeout"):
        assert issubclass(getattr(shmfeed, name), shmfeed.ShmfeedError), name
    assert issubclass(shmfeed.FeedTypeError, TypeError) and issubclass(shmfeed.EncodingError, TypeError)
    assert issubclass(shmfeed.FeedSendTimeout, TimeoutError)
    assert shmfeed.ErrMuxClosed is shmfeed.MuxClosedError


@pytest.mark.timeout(30)
def test_unencodable_value_reaches_nobody() -> None:
    feed = shmfeed.Feed()
    channels = [shmfeed.Channel(capacity=4) for _ in range(3)]
    subs = [feed.subscribe(c) for c in channels]
    with pytest.raises(TypeError):
        feed.send([1, 2, Plain()])
    assert feed.send([1, 2]) == 3
    for channel in channels:
        assert channel.recv(timeout=5) == [1, 2]
        with pytest.raises(TimeoutError):
            channel.recv(timeout=0)
    for sub in subs:
        sub.unsubscribe()


@pytest.mark.timeout(30)
def test_closed_channel_subscribed_to_a_feed_does_not_block_sends() -> None:
    feed = shmfeed.Feed()
    closed = _closed_channel()
    feed.subscribe(closed)  # allowed; it just never receives anything
    live = shmfeed.Channel(capacity=2)
    feed.subscribe(live)
    for i in range(5):
        assert feed.send(i) == 1
        assert live.recv(timeout=5) == i


@pytest.mark.timeout(30)
def test_unsubscribe_and_close_are_idempotent() -> None:
    feed = shmfeed.Feed()
    channel = shmfeed.Channel()
    sub = feed.subscribe(channel)
    for _ in range(3):
        sub.unsubscribe()
    assert sub.err().recv(timeout=5) is None
    for _ in range(3):
        channel.close()
        feed.close()
    scope = shmfeed.SubscriptionScope()
    scope.close()
    scope.close()
    assert scope.track(shmfeed.Feed().subscribe(shmfeed.Channel())) is None
    mux = shmfeed.TypeMux()
    mux.stop()
    mux.stop()
    assert mux.subscribe(int).chan().closed
    _still_usable()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [5_000, 70_000, 3 << 20], ids=["over-a-quarter", "over-the-ring", "3MiB"])
def test_value_larger_than_the_ring_is_delivered(size: int) -> None:
    feed = shmfeed.Feed()
    channel = shmfeed.Channel(capacity=2, buffer_size=4096)
    feed.subscribe(channel)
    value = os.urandom(size)
    assert feed.send(value) == 1
    assert channel.recv(timeout=30) == value
    channel.send(value)
    assert channel.recv(timeout=30) == value
    _still_usable()


@pytest.mark.timeout(180)
def test_a_300_mib_value_is_delivered() -> None:
    size = 300 << 20
    if shutil.disk_usage("/dev/shm").free < 2 * size or psutil.virtual_memory().available < 5 * size:
        pytest.skip("not enough room in /dev/shm or memory for a 300 MiB value")
    channel = shmfeed.Channel(capacity=2)
    value = b"\x5a" * size
    channel.send(value, timeout=60)
    got = channel.recv(timeout=60)
    assert type(got) is bytes and len(got) == size and got == value
    del got, value
    _still_usable()


@pytest.mark.timeout(30)
def test_register_type_bad_encoder_fails_cleanly() -> None:
    class Boom:
        pass

    def encode(_: Any) -> Any:
        raise RuntimeError("encoder exploded")

    shmfeed.register_type(Boom, encode, lambda v: Boom())
    channel = shmfeed.Channel()
    with pytest.raises(Exception, match="encoder exploded|Boom"):
        channel.send(Boom())
    with pytest.raises(TimeoutError):
        channel.recv(timeout=0)
    channel.send(Point(1))
    assert channel.recv(timeout=5) == Point(1)
