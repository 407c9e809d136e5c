"""Frozen statistics records for channels, feeds and subscriptions (the monitor's figures)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChannelStatistics:
    """Counters of one channel, read from shared memory without taking its lock.

    Attributes:
        sent: values ever committed to the channel.
        received: values ever taken from it.
        dropped: values discarded by the overflow policy (or found corrupt).
        evicted: times its subscriptions were ended for being too slow.
        waiting_senders: senders currently waiting for space.
        waiting_receivers: receivers currently waiting for a value.
        fill: values waiting to be received.
        capacity: most values it holds before senders wait.
        bytes_sent: bytes ever written to the ring (records with their headers).
        ring_bytes: size of its ring in shared memory.
        spilled: values too large for the ring that travelled as files.
        closed: whether it was closed.
    """

    sent: int
    received: int
    dropped: int
    evicted: int
    waiting_senders: int
    waiting_receivers: int
    fill: int
    capacity: int
    bytes_sent: int
    ring_bytes: int
    spilled: int
    closed: bool


@dataclass(frozen=True)
class FeedStatistics:
    """Counters of one feed.

    Attributes:
        name: the feed's name (None for an anonymous feed).
        elem_type: name of the element type, None until fixed.
        sent: values sent.
        delivered: deliveries to channels (a value sent to 3 channels counts 3).
        subscriptions: active subscriptions.
        closed: whether it was closed.
    """

    name: str | None
    elem_type: str | None
    sent: int
    delivered: int
    subscriptions: int
    closed: bool


@dataclass(frozen=True)
class SubscriptionStatistics:
    """State of one subscription and the channel it delivers to.

    Attributes:
        active: whether values are still delivered.
        channel: statistics of the subscribed channel (None if it is gone).
    """

    active: bool
    channel: ChannelStatistics | None
