"""A durable bridge's outbox on one feed (``_outbox``): made, or taken over from a killed
predecessor; and let go of at a clean close.

The outbox is the channel the bridge subscribes to the feed with. It is read without
taking (``_peek``), and a value is taken once JetStream has stored it, so a bridge killed
with SIGKILL loses nothing: its successor takes the outbox over (the feed names it, and
nothing removed it or its subscription meanwhile) and publishes from the first value not
taken. Each value has an index (``_peek``) and the outbox an *origin* that stays with it
(``origin_of``); a message's id is made of both, and a durable bridge publishes on a
subject of the origin's own, ``<feed subject>.<origin>``, so that a successor can ask
JetStream for the last message stored from the outbox and go on after it.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from . import _layout as L
from . import _outbox, _ring
from ._channel import Channel
from ._feed import Feed, FeedSubscription
from ._subscription import Subscription

CONTROL_SECONDS = 10.0  # the longest a take-over or a let-go waits for the feed's send lock
MAX_RING_BYTES_FOR = 8192  # an outbox's ring is sized for this many values of 512 bytes at most


def origin_of(home: str, channel_id: int) -> str:
    """An outbox's origin: the same for every bridge that reads it, another for any other
    outbox (of this namespace or any other: ``home`` is the namespace's keyed hash)."""
    return hashlib.sha256(f"{home}:{channel_id:016x}".encode()).hexdigest()[:24]


def open_outbox(feed: Feed[Any], key: int, capacity: int, label: str) -> tuple[Channel[Any], FeedSubscription, bool]:
    """The realm ``key``'s outbox on ``feed``: the one a killed bridge left (taken over:
    subscribed again and its old subscription ended in one step under the feed's send
    lock, so that every send reaches it once), or a new one. Returns the channel, its
    subscription and whether it was taken over."""
    core = feed._open()
    with core.sends_held(time.monotonic() + CONTROL_SECONDS) as words:
        left = _outbox.find(words, key)
        channel = _take_over(core.namespace, left) if left is not None else None
        adopted = channel is not None
        if channel is None:
            channel = Channel._private(capacity, _ring.default_ring_bytes(min(capacity, MAX_RING_BYTES_FOR)),
                                       "drop_newest", L.FLAG_OUTBOX, label)
        subscription = feed.subscribe(channel)
        assert isinstance(subscription, FeedSubscription)
        if left is not None:  # the predecessor's, ended only now: no send came between
            core.end_subscription_at(left.table_entry, left.sub_id)
        core.acquire()
        try:
            _outbox.record(words, key, _outbox.Outbox(channel._channel_id, subscription._sub_id, subscription._entry))
        finally:
            core.release_lock()
    return channel, subscription, adopted


def _take_over(namespace: str, left: _outbox.Outbox) -> Channel[Any] | None:
    """The outbox a killed bridge left, if it is still there and open."""
    channel = Channel._from_id(namespace, left.channel_id)
    core = channel._core
    if core is None or core.closed or not int(core.words[L.CHANNEL_FLAGS]) & L.FLAG_OUTBOX:
        return None
    return channel


def stop_receiving(feed: Feed[Any], subscription: Subscription) -> None:
    """A clean close, first step: the outbox's subscription ended between two sends, so
    that what the bridge reads after this is all the outbox will ever hold from it."""
    core = feed._core
    if core is None or core.released:
        return
    with core.sends_held(time.monotonic() + CONTROL_SECONDS):
        subscription.unsubscribe()


def forget(feed: Feed[Any], key: int, channel: Channel[Any]) -> None:
    """A clean close, once JetStream stored all the outbox held: the feed forgets it and
    it is closed (it goes with its last holder). Not called when something is left: the
    outbox then stays for the next durable bridge, which publishes the rest."""
    core = feed._core
    if core is not None and not core.released:
        with core.sends_held(time.monotonic() + CONTROL_SECONDS) as words:
            core.acquire()
            try:
                found = _outbox.find(words, key)
                if found is not None and found.channel_id == channel._channel_id:
                    _outbox.forget(words, key)
            finally:
                core.release_lock()
    channel.close()
