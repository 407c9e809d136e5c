"""A bridge is not a sender whose death fails subscriptions (SPEC §7), without NATS.

A child plays the bridge: it subscribes its own channel to the feed and injects a value
through the bridge's path (``Feed._send_encoded``, skipping its channel), then is SIGKILLed.
Once the registry has recovered from the death (the child's attach slot gone from the
feed: recovery ends its subscriptions and decides on the senders before it drops the
slot), the parent's subscription is still healthy. The control is a child that sends the
ordinary way: its death fails the subscription with ``SenderDiedError``, as ever.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any

import pytest

import shmfeed
from shmfeed import _codec
from shmfeed import _layout as L
from shmfeed.testing import registry_pid, running, wait_until

from _kill_workers import get, kill, wait_watched
from _workers import reporting

FEED = "prices"
QUIET_SECONDS = 0.5  # after recovery, an err() that stays empty this long got nothing


@reporting
def _bridge_like(results: shmfeed.Channel, how: str) -> None:
    """Subscribe like a bridge, send one value (``how``: "inject" or "send"), then wait to be killed."""
    feed: shmfeed.Feed[Any] = shmfeed.Feed(FEED)
    own = shmfeed.Channel(16, overflow="drop_newest")
    feed.subscribe(own)
    if how == "inject":
        feed._send_encoded(_codec.encode(("tick", 1)), _codec.type_name(tuple), own._channel_id)
    else:
        feed.send(("tick", 1))
    results.send(("ready", os.getpid()))
    signal.pause()


def _killed_after_one_value(method: str, namespace: str, how: str) -> tuple[shmfeed.Channel, Any]:
    """Run the child, get its value, SIGKILL it, wait for the registry's recovery: the
    parent's channel and subscription."""
    feed: shmfeed.Feed[Any] = shmfeed.Feed(FEED)
    channel = shmfeed.Channel(16)
    sub = feed.subscribe(channel)
    results = shmfeed.Channel(16)
    registry_pid(namespace)
    with running(multiprocessing.get_context(method), (_bridge_like, (namespace, results, how))) as (child,):
        assert get(results) == ("ready", child.pid)
        assert channel.recv(timeout=10) == ("tick", 1)
        core = feed._core
        assert core is not None
        flagged = {pid for pid, _ in L.attached_processes(core.words, L.SLOT_SENDER)}
        assert (child.pid in flagged) == (how == "send"), flagged
        wait_watched(namespace, child.pid)
        kill(child.pid)
        wait_until(lambda: child.pid not in {pid for pid, _ in L.attached_processes(core.words)},
                   timeout=10, what="the registry's recovery dropping the killed child from the feed")
    assert child.exitcode == -signal.SIGKILL, child.exitcode
    assert feed.statistics().subscriptions <= 1  # the child's own subscription ended with it
    results.close()
    return channel, sub


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_killed_bridge_fails_no_subscription(method: str, namespace: str) -> None:
    channel, sub = _killed_after_one_value(method, namespace, "inject")
    with pytest.raises(TimeoutError):
        sub.err().recv(timeout=QUIET_SECONDS)
    assert shmfeed.Feed(FEED).send(("tick", 2)) == 1  # still subscribed, still delivered
    assert channel.recv(timeout=5) == ("tick", 2)
    sub.unsubscribe()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_killed_sender_still_fails_subscriptions(method: str, namespace: str) -> None:
    channel, sub = _killed_after_one_value(method, namespace, "send")
    assert isinstance(sub.err().recv(timeout=QUIET_SECONDS), shmfeed.SenderDiedError)
    sub.unsubscribe()
