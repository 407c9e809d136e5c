"""Process targets for test_monitor (importable, so every start method can run them)."""

from __future__ import annotations

import os

import shmfeed


def hold_two_channels(namespace: str, ready, stop) -> None:
    """Two channels subscribed to Feed("beta"), then wait."""
    os.environ["SHMFEED_NAMESPACE"] = namespace
    feed = shmfeed.Feed("beta")
    channels = [shmfeed.Channel(capacity=8) for _ in range(2)]
    subs = [feed.subscribe(channel) for channel in channels]
    ready.put(os.getpid())
    stop.get()
    del subs


def send_until_blocked(namespace: str, ready, feed_name: str = "alpha") -> None:
    """Send on Feed(feed_name) forever: blocks once a subscriber's channel is full."""
    os.environ["SHMFEED_NAMESPACE"] = namespace
    feed = shmfeed.Feed(feed_name)
    ready.put(os.getpid())
    value = 0
    while True:
        feed.send(value)
        value += 1


def stream(namespace: str, ready: shmfeed.Channel, stop: shmfeed.Channel) -> None:
    """Send on Feed("live") until told to stop (traffic for the live view)."""
    os.environ["SHMFEED_NAMESPACE"] = namespace
    feed = shmfeed.Feed("live")
    ready.send(os.getpid())
    value = 0
    while not len(stop):
        feed.send(value)
        value += 1


def hold_channel_under_name(namespace: str, comm: bytes, ready, stop) -> None:
    """Rename this process (its /proc comm, which anyone may set for their own process) to
    ``comm``, make a channel, then wait: the channel's owner shows under that name."""
    os.environ["SHMFEED_NAMESPACE"] = namespace
    with open("/proc/self/comm", "wb") as own_name:
        own_name.write(comm)
    channel = shmfeed.Channel(capacity=8)
    ready.put(os.getpid())
    stop.get()
    del channel


def read_slowly(namespace: str, channel: shmfeed.Channel, count: int, ready, stop) -> None:
    """The slow reader: take ``count`` values, report, then read nothing until told to stop."""
    os.environ["SHMFEED_NAMESPACE"] = namespace
    for _ in range(count):
        channel.recv(timeout=30)
    ready.put(os.getpid())
    stop.get()


def hold_without_reading(namespace: str, channel: shmfeed.Channel, ready, stop) -> None:
    """Hold a channel (a mapping and a Channel object) and never read it."""
    os.environ["SHMFEED_NAMESPACE"] = namespace
    ready.put((os.getpid(), channel.name))
    stop.get()
    del channel
