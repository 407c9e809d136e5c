"""The send that skips one channel (a bridge's injection, see ``_bridge``), on both paths."""

from __future__ import annotations

import pytest

import shmfeed
from shmfeed import _codec

pytestmark = pytest.mark.timeout(30)


def _drain(channel: shmfeed.Channel) -> list:
    out = []
    while True:
        try:
            out.append(channel.recv_nowait())
        except shmfeed.ChannelEmpty:
            return out


def test_skip_leaves_out_one_channel_only(data_path: str) -> None:
    feed = shmfeed.Feed("skip")
    first, skipped, last = shmfeed.Channel(64), shmfeed.Channel(64), shmfeed.Channel(64)
    assert (first._live_core()._fast is not None) == (data_path == "c")
    subs = [feed.subscribe(first), feed.subscribe(skipped), feed.subscribe(skipped), feed.subscribe(last)]
    big = b"x" * 100_000  # a spill file in these rings: the Python loop
    values = [(1,), ({"a": (1, 2)},), (big,), (4,)]  # one type: the feed's
    for index, value in enumerate(values):
        payload = _codec.encode(value)
        if index % 2:
            assert feed.send(value) == 4  # an ordinary send in between reaches everyone
        else:
            core = feed._core
            assert core is not None
            assert core.send(payload, skip_channel=skipped._channel_id) == 2
    assert _drain(first) == values
    assert _drain(last) == values
    assert _drain(skipped) == [values[1], values[1], values[3], values[3]]
    for sub in subs:
        sub.unsubscribe()
    for channel in (first, skipped, last):
        channel.close()


def test_send_encoded_fixes_and_checks_the_type(data_path: str) -> None:
    feed = shmfeed.Feed("typed")
    mine, other = shmfeed.Channel(8), shmfeed.Channel(8)
    with feed.subscribe(mine), feed.subscribe(other):
        assert feed._send_encoded(_codec.encode((1, "a")), _codec.type_name(tuple), mine._channel_id) == 1
        with pytest.raises(shmfeed.FeedTypeError):
            feed._send_encoded(_codec.encode(1), _codec.type_name(int), mine._channel_id)
        with pytest.raises(shmfeed.FeedTypeError):
            feed.send(1)
        assert other.recv(1) == (1, "a")
        assert _drain(mine) == []
    mine.close()
    other.close()


def test_skip_only_subscriber_reaches_nobody(data_path: str) -> None:
    feed = shmfeed.Feed("alone")
    mine = shmfeed.Channel(8)
    with feed.subscribe(mine):
        assert feed._send_encoded(_codec.encode(1), _codec.type_name(int), mine._channel_id) == 0
        assert feed.send(2) == 1
        assert _drain(mine) == [2]
    mine.close()
