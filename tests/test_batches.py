"""Batched calls: ``Channel.send_many``/``recv_many`` and ``Feed.send_many``: one Python call
for many values, with the ordering, lossless and error rules of the single calls."""

from __future__ import annotations

import pytest

import shmfeed
from shmfeed import ChannelCorruptError, EncodingError, FeedSendTimeout, FeedTypeError

pytestmark = pytest.mark.timeout(60)


def test_send_many_and_recv_many_keep_order_and_take_only_what_is_there(namespace: str) -> None:
    channel: shmfeed.Channel[int] = shmfeed.Channel(64)
    try:
        channel.send_many(range(10))
        assert channel.recv_many(4) == [0, 1, 2, 3]
        assert channel.recv_many() == [4, 5, 6, 7, 8, 9]  # what is there: it does not wait for more
        with pytest.raises(TimeoutError):
            channel.recv_many(8, timeout=0.05)
        channel.send_many([])  # nothing to send is fine
        channel.send_many([10, 11])
        channel.close()
        assert channel.recv_many(8) == [10, 11]  # closed: what was sent before is kept
        with pytest.raises(shmfeed.ChannelClosed):
            channel.recv_many()
        with pytest.raises(ValueError, match="max_items must be a positive int"):
            channel.recv_many(0)
    finally:
        channel.close()


def test_a_bad_value_anywhere_in_a_batch_sends_none_of_it(namespace: str) -> None:
    channel: shmfeed.Channel[int] = shmfeed.Channel(int, 64)
    feed: shmfeed.Feed[int] = shmfeed.Feed("batches")
    subscription = feed.subscribe(channel)
    try:
        with pytest.raises(FeedTypeError):
            channel.send_many([1, 2, "three", 4])  # type: ignore[list-item]
        with pytest.raises(EncodingError):
            shmfeed.Channel(64).send_many([1, object(), 3])
        with pytest.raises(FeedTypeError):
            feed.send_many([1, 2.5])  # type: ignore[list-item]
        assert len(channel) == 0 and feed.statistics().sent == 0
        assert feed.send_many([1, 2, 3]) == [1, 1, 1]
        assert channel.recv_many() == [1, 2, 3]
    finally:
        subscription.unsubscribe()
        channel.close()
        feed.detach()


def test_a_batch_that_runs_out_of_time_says_how_many_were_sent(namespace: str) -> None:
    channel: shmfeed.Channel[int] = shmfeed.Channel(4)
    feed: shmfeed.Feed[int] = shmfeed.Feed("batches")
    other: shmfeed.Channel[int] = shmfeed.Channel(3)
    subscription = feed.subscribe(other)
    try:
        with pytest.raises(TimeoutError) as timed_out:
            channel.send_many(range(10), timeout=0.2)
        assert timed_out.value.sent == 4  # type: ignore[attr-defined]
        assert channel.recv_many() == [0, 1, 2, 3]
        with pytest.raises(FeedSendTimeout) as feed_timed_out:
            feed.send_many(range(10), timeout=0.2)
        assert feed_timed_out.value.values_sent == 3  # type: ignore[attr-defined]
        assert other.recv_many() == [0, 1, 2]
    finally:
        subscription.unsubscribe()
        other.close()
        channel.close()
        feed.detach()


def test_an_undecodable_value_ends_a_batch_and_is_raised_next(namespace: str) -> None:
    channel: shmfeed.Channel[int] = shmfeed.Channel(64)
    try:
        core = channel._live_core()
        channel.send_many([1, 2])
        core.put(b"\xc1", None)  # not msgpack: what damage or another version would leave
        channel.send_many([3, 4])
        assert channel.recv_many() == [1, 2]  # nothing taken is lost
        with pytest.raises(ChannelCorruptError):
            channel.recv_many()  # the error, in its place
        assert channel.recv_many() == [3, 4]
    finally:
        channel.close()


def test_a_batch_from_another_process_arrives_whole_and_in_order(namespace: str, mp_context: object) -> None:
    import _workers as W

    channel: shmfeed.Channel[int] = shmfeed.Channel(256)
    child = mp_context.Process(target=W.send_many_values, args=(namespace, channel, 5000))  # type: ignore[attr-defined]
    child.start()
    try:
        got: list[int] = []
        while len(got) < 5000:
            got += channel.recv_many(512, timeout=30)
        assert got == list(range(5000))
        child.join(30)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)
        channel.close()


def test_a_feed_batch_of_mixed_sizes_reaches_every_channel_whole_and_in_order(namespace: str) -> None:
    # Small values go in C under one hold of the send lock; a spilled one, or one sent in
    # parts, goes alone through the Python send, and the batch goes on after it.
    blobs = [bytes([i]) * size for i, size in enumerate([10, 300_000, 20, 5_000, 2_000_000, 30, 40])]
    # Each of these encodes to over 64 KiB: a lone send would encode it into a view of a
    # buffer that the next encode reuses (a batch once sent released views).
    texts = [{"n": i, "text": str(i) * 100_000} for i in range(4)]
    bytes_feed: shmfeed.Feed[bytes] = shmfeed.Feed("mixed-bytes")
    text_feed: shmfeed.Feed[dict] = shmfeed.Feed("mixed-texts")
    channels = [shmfeed.Channel(64), shmfeed.Channel(64)]
    subscriptions = [feed.subscribe(channel) for feed in (bytes_feed, text_feed) for channel in channels]
    try:
        assert bytes_feed.send_many(blobs) == [2] * len(blobs)
        assert text_feed.send_many(texts) == [2] * len(texts)
        channels[0].send_many(texts)  # a channel's own batch keeps every value whole too
        for channel in channels:
            got = [channel.recv(timeout=5) for _ in range(len(blobs) + len(texts))]
            assert got == [*blobs, *texts]
        assert [channels[0].recv(timeout=5) for _ in texts] == texts
        assert bytes_feed.statistics().sent == len(blobs) and text_feed.statistics().sent == len(texts)
    finally:
        for subscription in subscriptions:
            subscription.unsubscribe()
        for channel in channels:
            channel.close()
        bytes_feed.detach()
        text_feed.detach()


def test_a_feed_batch_waits_for_room_mid_batch_and_counts_drops_per_value(namespace: str) -> None:
    import threading

    feed: shmfeed.Feed[int] = shmfeed.Feed("room")
    slow: shmfeed.Channel[int] = shmfeed.Channel(4)  # fills again and again: the batch waits
    lossy: shmfeed.Channel[int] = shmfeed.Channel(8, overflow="drop_newest")  # never read: drops
    subscriptions = [feed.subscribe(slow), feed.subscribe(lossy)]
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.extend(slow.recv(timeout=10) for _ in range(300)))
    reader.start()
    try:
        counts = feed.send_many(range(300), timeout=30)
        reader.join(30)
        assert not reader.is_alive() and got == list(range(300))
        assert counts == [2] * 8 + [1] * 292  # the lossy channel took the first 8
        assert lossy.recv_many() == list(range(8))
        assert lossy.statistics().dropped == 292 and feed.statistics().sent == 300
    finally:
        reader.join(10)
        for subscription in subscriptions:
            subscription.unsubscribe()
        slow.close()
        lossy.close()
        feed.detach()
