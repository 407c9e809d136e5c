"""Feed behaviour: Python ports of go-ethereum's event/feed_test.go, plus shmfeed's additions."""

from __future__ import annotations

import pickle
import threading

import pytest

import shmfeed
from shmfeed.testing import wait_until

pytestmark = pytest.mark.timeout(60)


# --- TestFeedPanics ------------------------------------------------------------------------


def test_send_of_another_type_raises_feed_type_error():
    feed = shmfeed.Feed()
    feed.send(2)
    with pytest.raises(shmfeed.FeedTypeError) as caught:
        feed.send(2.0)
    assert str(caught.value) == "event: wrong type in Send got float, want int"
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, shmfeed.ShmfeedError)


def test_subscribe_of_a_channel_typed_otherwise_raises():
    feed = shmfeed.Feed()
    feed.subscribe(shmfeed.Channel(int))
    with pytest.raises(shmfeed.FeedTypeError, match="event: wrong type in Subscribe got str, want int"):
        feed.subscribe(shmfeed.Channel(str))


def test_typed_subscribe_fixes_the_type_for_send():
    feed = shmfeed.Feed()
    feed.subscribe(shmfeed.Channel(int))
    with pytest.raises(shmfeed.FeedTypeError, match="in Send got str, want int"):
        feed.send("x")


@pytest.mark.parametrize("not_a_channel", [None, 5, [], "chan", threading.Event()])
def test_subscribe_of_a_non_channel_raises_type_error(not_a_channel):
    with pytest.raises(TypeError, match="event: Subscribe argument does not have sendable channel type"):
        shmfeed.Feed().subscribe(not_a_channel)


def test_elem_type_and_generic_alias_fix_the_type():
    with pytest.raises(shmfeed.FeedTypeError):
        shmfeed.Feed(elem_type=int).send("x")
    with pytest.raises(shmfeed.FeedTypeError):
        shmfeed.Feed[int]().send("x")
    assert shmfeed.Feed[str]().send("fine") == 0


# --- TestFeed ---------------------------------------------------------------------------------


def test_every_subscriber_gets_every_value_then_unsubscribe_stops_delivery():
    feed = shmfeed.Feed()
    nsubs, nsends = 10, 20
    channels = [shmfeed.Channel(capacity=4) for _ in range(nsubs)]
    subs = [feed.subscribe(channel) for channel in channels]
    received = {index: [] for index in range(nsubs)}

    def reader(index: int) -> None:
        for _ in range(nsends):
            received[index].append(channels[index].recv(timeout=20))

    threads = [threading.Thread(target=reader, args=(index,)) for index in range(nsubs)]
    for thread in threads:
        thread.start()
    for value in range(nsends):
        assert feed.send(value) == nsubs
    for thread in threads:
        thread.join()
    assert all(got == list(range(nsends)) for got in received.values())
    for sub in subs:
        sub.unsubscribe()
    assert feed.send(99) == 0
    assert all(len(channel) == 0 for channel in channels)


# --- TestFeedSubscribeSameChannel -------------------------------------------------------------


def test_the_same_channel_subscribed_k_times_gets_k_copies():
    feed = shmfeed.Feed()
    channel = shmfeed.Channel()
    sub1 = feed.subscribe(channel)
    sub2 = feed.subscribe(channel)
    assert feed.send(1) == 2
    assert [channel.recv(0), channel.recv(0)] == [1, 1]
    sub3 = feed.subscribe(channel)
    assert feed.send(2) == 3
    assert [channel.recv(0) for _ in range(3)] == [2, 2, 2]
    sub1.unsubscribe()
    assert feed.send(3) == 2
    sub2.unsubscribe()
    sub3.unsubscribe()
    assert feed.send(4) == 0
    assert [channel.recv(0), channel.recv(0)] == [3, 3]
    assert len(channel) == 0


# --- TestFeedSubscribeBlockedPost ---------------------------------------------------------------


def test_subscribing_while_a_send_blocks_takes_effect_at_the_next_send():
    feed = shmfeed.Feed()
    blocking = shmfeed.Channel(capacity=1)
    feed.subscribe(blocking)
    feed.send(0)  # fills it
    done = threading.Event()
    counts: list[int] = []

    def send_one() -> None:
        counts.append(feed.send(1))
        done.set()

    sender = threading.Thread(target=send_one)
    sender.start()
    wait_until(lambda: blocking.statistics().waiting_senders == 1)
    late = shmfeed.Channel()
    feed.subscribe(late)
    assert blocking.recv(timeout=5) == 0
    assert done.wait(10)
    sender.join()
    assert counts == [1] and len(late) == 0  # the blocked send did not reach the late channel
    assert blocking.recv(timeout=5) == 1
    assert feed.send(2) == 2
    assert late.recv(0) == 2


# --- TestFeedUnsubscribeBlockedPost -------------------------------------------------------------


def test_unsubscribe_releases_a_send_blocked_on_that_channel():
    feed = shmfeed.Feed()
    stuck = shmfeed.Channel(capacity=1)
    reader = shmfeed.Channel(capacity=100)
    stuck_sub = feed.subscribe(stuck)
    feed.subscribe(reader)
    assert feed.send(0) == 2
    counts: list[int] = []
    sender = threading.Thread(target=lambda: counts.append(feed.send(1)))
    sender.start()
    wait_until(lambda: stuck.statistics().waiting_senders == 1)
    stuck_sub.unsubscribe()
    sender.join(10)
    assert not sender.is_alive()
    assert counts == [1]  # delivered to the reader only
    assert [reader.recv(0), reader.recv(0)] == [0, 1]
    assert stuck.recv(0) == 0 and len(stuck) == 0


def test_unsubscribe_of_a_channel_that_already_received_does_not_block():
    feed = shmfeed.Feed()
    channels = [shmfeed.Channel() for _ in range(3)]
    subs = [feed.subscribe(channel) for channel in channels]
    assert feed.send(1) == 3
    for sub in subs:
        sub.unsubscribe()
        sub.unsubscribe()  # idempotent
    assert feed.send(2) == 0
    assert [channel.recv(0) for channel in channels] == [1, 1, 1]


def test_unsubscribe_before_the_first_send():
    feed = shmfeed.Feed()
    sub = feed.subscribe(shmfeed.Channel())
    sub.unsubscribe()
    assert feed.send(1) == 0
    assert sub.err().recv(0) is None


def test_unsubscribe_from_many_threads_at_once():
    feed = shmfeed.Feed()
    sub = feed.subscribe(shmfeed.Channel())
    threads = [threading.Thread(target=sub.unsubscribe) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert feed.statistics().subscriptions == 0


# --- shmfeed additions ----------------------------------------------------------------------------


def test_a_named_feed_is_the_same_feed_wherever_opened():
    first = shmfeed.Feed("prices")
    channel = shmfeed.Channel()
    first.subscribe(channel)
    assert shmfeed.Feed("prices").send(101) == 1
    assert channel.recv(0) == 101
    assert shmfeed.Feed("other").send(5) == 0


def test_a_feed_pickles_to_the_same_feed():
    feed = shmfeed.Feed()
    channel = shmfeed.Channel()
    feed.subscribe(channel)
    copy = pickle.loads(pickle.dumps(feed))
    assert copy.send("x") == 1
    assert channel.recv(0) == "x"


def test_close_ends_subscriptions_successfully_and_refuses_sends():
    feed = shmfeed.Feed()
    channel = shmfeed.Channel()
    sub = feed.subscribe(channel)
    feed.close()
    assert sub.err().recv(timeout=5) is None
    with pytest.raises(shmfeed.FeedClosed):
        feed.send(1)
    with pytest.raises(shmfeed.FeedClosed):
        feed.subscribe(shmfeed.Channel())


def test_closing_a_channel_ends_its_subscriptions_at_the_next_send():
    feed = shmfeed.Feed()
    closed, open_ = shmfeed.Channel(), shmfeed.Channel()
    sub = feed.subscribe(closed)
    feed.subscribe(open_)
    closed.close()
    assert feed.send(1) == 1
    assert sub.err().recv(timeout=5) is None
    assert feed.statistics().subscriptions == 1


def test_unencodable_value_reaches_no_one():
    feed = shmfeed.Feed()
    channel = shmfeed.Channel()
    feed.subscribe(channel)
    feed.send({"ok": 1})
    with pytest.raises(TypeError):
        feed.send({"bad": object()})
    assert feed.send({"ok": 2}) == 1
    assert [channel.recv(0), channel.recv(0)] == [{"ok": 1}, {"ok": 2}]


def test_a_large_value_reaches_every_subscriber_once():
    feed = shmfeed.Feed()
    channels = [shmfeed.Channel(buffer_size=64 * 1024) for _ in range(3)]
    for channel in channels:
        feed.subscribe(channel)
    big = b"\x07" * (3 * 1024 * 1024)
    assert feed.send(big) == 3
    assert all(channel.recv(0) == big for channel in channels)
    assert all(channel.statistics().spilled == 1 for channel in channels)


def test_sixty_four_mebibytes_arrive_intact():
    feed = shmfeed.Feed()
    channel = shmfeed.Channel()
    feed.subscribe(channel)
    big = bytes(range(256)) * (64 * 1024 * 1024 // 256)
    assert feed.send(big) == 1
    assert channel.recv(timeout=30) == big


def test_statistics_of_feed_and_subscription():
    feed = shmfeed.Feed("stats")
    channel = shmfeed.Channel()
    sub = feed.subscribe(channel)
    feed.send(1)
    feed.send(2)
    stats = feed.statistics()
    assert (stats.name, stats.elem_type, stats.sent, stats.delivered, stats.subscriptions) == ("stats", "int", 2, 2, 1)
    sub_stats = sub.statistics()
    assert sub_stats.active and sub_stats.channel is not None and sub_stats.channel.fill == 2
    sub.unsubscribe()
    assert not sub.statistics().active


def test_evict_ends_the_subscription_with_slow_subscriber_error():
    feed = shmfeed.Feed()
    slow = shmfeed.Channel(capacity=1, overflow="evict")
    fast = shmfeed.Channel()
    sub = feed.subscribe(slow)
    feed.subscribe(fast)
    assert feed.send(1) == 2
    assert feed.send(2) == 1  # slow is full: evicted, not waited for
    assert isinstance(sub.err().recv(timeout=5), shmfeed.SlowSubscriberError)
    assert sub.err().recv(timeout=5) is None
    assert slow.statistics().evicted == 1
    assert feed.send(3) == 1


def test_drop_newest_subscriber_does_not_block_the_feed():
    feed = shmfeed.Feed()
    lossy = shmfeed.Channel(capacity=1, overflow="drop_newest")
    feed.subscribe(lossy)
    assert feed.send(1) == 1
    assert feed.send(2) == 0  # skipped, not counted
    assert lossy.statistics().dropped == 1


def test_select_over_data_and_error_channels():
    feed = shmfeed.Feed()
    channel = shmfeed.Channel()
    sub = feed.subscribe(channel)
    feed.send("v")
    assert shmfeed.select(channel, sub.err(), timeout=5) == (channel, "v")
    with pytest.raises(TimeoutError):
        shmfeed.select(channel, sub.err(), timeout=0.05)
    sub.unsubscribe()
    err = sub.err()
    assert shmfeed.select(channel, err, timeout=5) == (err, None)


def test_select_wakes_when_a_value_arrives_from_another_thread():
    a, b = shmfeed.Channel(), shmfeed.Channel()
    results: list[tuple[object, object]] = []
    waiter = threading.Thread(target=lambda: results.append(shmfeed.select(a, b, timeout=20)))
    waiter.start()
    wait_until(lambda: b.statistics().waiting_receivers == 1)
    b.send("hello")
    waiter.join(10)
    assert results == [(b, "hello")]
    assert a.statistics().waiting_receivers == 0


def test_select_refuses_non_channels():
    with pytest.raises(TypeError):
        shmfeed.select()
    with pytest.raises(TypeError):
        shmfeed.select(5)


def test_sends_after_the_first_keep_every_rule_of_the_first():
    """After a first send fixes the feed's type, a value of that exact type takes a short
    path (the C encoder and the C send); everything else must still meet the full rules."""

    class Ordered(dict):  # not a dict to shmfeed: its own type, which it does not encode
        pass

    feed = shmfeed.Feed()
    channel = shmfeed.Channel(64)
    sub = feed.subscribe(channel)
    big = {"blob": bytes(1 << 20)}
    assert feed.send({"a": 1}) == 1
    assert feed.send({"a": 2}) == 1
    with pytest.raises(shmfeed.FeedTypeError, match="in Send got int, want dict"):
        feed.send(5)
    with pytest.raises(shmfeed.EncodingError):
        feed.send(Ordered(a=1))
    with pytest.raises(shmfeed.EncodingError, match=r'value\["x"\]'):
        feed.send({"x": object()})
    assert feed.send({"t": (1, 2)}) == 1  # a tuple travels as an ext type: msgpack's path
    assert [feed.send(value) for value in (big, {"a": 3}, big, {"a": 4})] == [1, 1, 1, 1]  # large and back
    got = [channel.recv(timeout=5) for _ in range(7)]
    assert got == [{"a": 1}, {"a": 2}, {"t": (1, 2)}, big, {"a": 3}, big, {"a": 4}]
    assert len(channel) == 0  # nothing of the refused values arrived
    feed.close()
    with pytest.raises(shmfeed.FeedClosed):
        feed.send({"a": 5})
    sub.unsubscribe()
    channel.close()
