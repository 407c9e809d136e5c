"""Delivery marks (``_marks``): a durable bridge's marked sends deliver each stream
sequence once per subscription, even when the sending process is SIGKILLed in the middle
of a send and another process sends the same sequences again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import shmfeed
from shmfeed import _codec, _marks
from shmfeed.testing import wait_until

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
KEY = _marks.key_of("default")
INT = _codec.type_name(int)

SENDER = """
import sys
import shmfeed
from shmfeed import _codec, _marks
feed = shmfeed.Feed(sys.argv[1])
key, first, last, batch = _marks.key_of("default"), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("ready", flush=True)
if batch == 1:
    for sequence in range(first, last + 1):
        feed._send_encoded(_codec.encode(sequence), _codec.type_name(int), 0, mark=_marks.Mark(key, sequence))
else:  # a durable bridge's injector: many marked sends under one hold of the send lock
    for start in range(first, last + 1, batch):
        feed._send_marked_many([(_codec.encode(sequence), _codec.type_name(int), _marks.Mark(key, sequence))
                                for sequence in range(start, min(start + batch, last + 1))], 0)
"""


def _marked(feed: shmfeed.Feed[int], sequence: int) -> int:
    return feed._send_encoded(_codec.encode(sequence), INT, 0, mark=_marks.Mark(KEY, sequence))


def test_a_sequence_is_delivered_once_and_older_ones_are_skipped() -> None:
    feed: shmfeed.Feed[int] = shmfeed.Feed("marks")
    channels = [shmfeed.Channel(16) for _ in range(2)]
    subscriptions = [feed.subscribe(channel) for channel in channels]
    try:
        assert _marked(feed, 5) == 2
        assert _marked(feed, 5) == _marks.ALREADY_APPLIED
        assert _marked(feed, 3) == _marks.ALREADY_APPLIED
        assert _marked(feed, 6) == 2
        assert feed.send(7) == 2  # an ordinary send is not marked
        for channel in channels:
            assert [channel.recv(0) for _ in range(3)] == [5, 6, 7] and len(channel) == 0
        assert _marks.applied(feed._core.words, KEY) == 6
        assert _marks.applied(feed._core.words, _marks.key_of("other")) == 0
    finally:
        for subscription, channel in zip(subscriptions, channels):
            subscription.unsubscribe()
            channel.close()
        feed.detach()


def test_a_resumed_send_reaches_only_the_subscriptions_a_dead_sender_had_not() -> None:
    feed: shmfeed.Feed[int] = shmfeed.Feed("marks")
    first, second = shmfeed.Channel(16), shmfeed.Channel(16)
    subscriptions = [feed.subscribe(first), feed.subscribe(second)]
    try:
        core = feed._core
        word = _marks.entry_word(core.words, KEY)
        _marks.begin(core.words, word, 9)  # what a bridge killed after reaching the first did
        _marks.settled(core.words, word, 0)
        late = shmfeed.Channel(16)  # subscribed after that send began: it never gets it
        subscriptions.append(feed.subscribe(late))
        assert _marked(feed, 9) == 1
        assert [second.recv(0)] == [9] and len(first) == 0 and len(late) == 0
        subscriptions[-1].unsubscribe()
        late.close()
    finally:
        for subscription, channel in zip(subscriptions[:2], (first, second)):
            subscription.unsubscribe()
            channel.close()
        feed.detach()


def test_marked_sends_many_at_once_answer_each_as_its_own_send_would() -> None:
    feed: shmfeed.Feed[int] = shmfeed.Feed("marks")
    channels = [shmfeed.Channel(16) for _ in range(2)]
    subscriptions = [feed.subscribe(channel) for channel in channels]
    try:
        assert _marked(feed, 4) == 2
        items = [(_codec.encode(n), INT, _marks.Mark(KEY, n)) for n in (5, 5, 3, 6)]
        items.append((_codec.encode("seven"), _codec.type_name(str), _marks.Mark(KEY, 7)))  # the wrong type
        items.append((_codec.encode(8), INT, _marks.Mark(KEY, 8)))
        answers = feed._send_marked_many(items, 0)
        assert answers[:4] == [2, _marks.ALREADY_APPLIED, _marks.ALREADY_APPLIED, 2]
        assert isinstance(answers[4], shmfeed.FeedTypeError) and answers[5] == 2
        for channel in channels:
            assert [channel.recv(0) for _ in range(4)] == [4, 5, 6, 8]
            assert len(channel) == 0
        assert _marks.applied(feed._core.words, KEY) == 8
    finally:
        for subscription, channel in zip(subscriptions, channels):
            subscription.unsubscribe()
            channel.close()
        feed.detach()


def test_marks_of_two_realms_and_a_third_refused() -> None:
    feed: shmfeed.Feed[int] = shmfeed.Feed("marks")
    try:
        for realm in ("one", "two"):
            assert feed._send_encoded(_codec.encode(1), INT, 0, mark=_marks.Mark(_marks.key_of(realm), 1)) == 0
        with pytest.raises(shmfeed.TableFullError, match="durable bridges of 2 other realms"):
            feed._send_encoded(_codec.encode(1), INT, 0, mark=_marks.Mark(_marks.key_of("three"), 1))
    finally:
        feed.detach()


@pytest.mark.parametrize(("round_", "batch"), [(round_, 1) for round_ in range(6)] + [(1, 100), (3, 100), (5, 64)])
def test_a_sender_sigkilled_mid_stream_then_redone_delivers_each_sequence_once(round_: int, batch: int) -> None:
    """What a restarted durable bridge does: a process sending marked values is SIGKILLed
    at a random moment; another sends the same sequences from the start again. Every
    subscription has each sequence exactly once, in order."""
    feed: shmfeed.Feed[int] = shmfeed.Feed("marks")
    channels = [shmfeed.Channel(1 << 15) for _ in range(3)]
    subscriptions = [feed.subscribe(channel) for channel in channels]
    last = 20000
    try:
        sender = subprocess.Popen([sys.executable, "-c", SENDER, "marks", "1", str(last), str(batch)],
                                  env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
        assert sender.stdout is not None and sender.stdout.readline() == "ready\n"
        reached = 500 + round_ * 1500
        wait_until(lambda: len(channels[-1]) >= reached, 30, "the sender under way")
        sender.send_signal(signal.SIGKILL)
        assert sender.wait(10) == -signal.SIGKILL
        sender.stdout.close()
        # The dead sender may hold the feed's send lock: the registry frees it for the redo.
        redelivered = sum(_marked(feed, sequence) == _marks.ALREADY_APPLIED for sequence in range(1, last + 1))
        assert redelivered >= reached - 1
        for index, channel in enumerate(channels):
            got = [channel.recv(0) for _ in range(len(channel))]
            assert got == list(range(1, last + 1)), (
                f"channel {index}: {len(got)} values, first wrong at "
                f"{next((i for i, n in enumerate(got) if n != i + 1), None)}")
    finally:
        for subscription, channel in zip(subscriptions, channels):
            subscription.unsubscribe()
            channel.close()
        feed.detach()
