"""Process targets for ``test_errors.py``: errors that cross processes.

Module-level so that spawn children import them; this module imports none of the value
classes the tests send, so a child knows them only if a test makes it import them.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import shmfeed
from shmfeed import _errors, _layout

WAIT = 30.0


def _report(results: shmfeed.Channel, fn: Any, *args: Any) -> None:
    try:
        fn(results, *args)
    except BaseException:
        results.send(("error", traceback.format_exc()), timeout=WAIT)
        raise


def fail_every_subscription(namespace: str, results: shmfeed.Channel, feed_name: str) -> None:
    """End the feed's subscriptions (made by the parent) with errors of several classes."""
    os.environ["SHMFEED_NAMESPACE"] = namespace

    def run(results: shmfeed.Channel) -> None:
        feed = shmfeed.Feed(feed_name)
        core = feed._open()
        errors = [
            _errors.FeedTypeError("Send", "str", "int"),
            _errors.FeedSendTimeout("shmfeed: timed out; send again", delivered=2, pending=("ab", "cd")),
            _errors.UnknownTypeError("app.Point"),
            _errors.SenderDiedError("shmfeed: the feed's last sender died; resubscribe"),
        ]
        subs = sorted(_layout.active_subscriptions(core.words, core.table), key=lambda sub: sub.entry)
        for sub, error in zip(subs, errors):
            core.end_subscription(sub.entry, sub.sub_id, sub.channel_id, sub.err_channel_id, error)
        results.send(("done", len(subs)), timeout=WAIT)

    _report(results, run)


def receive_unknown_then_known(namespace: str, results: shmfeed.Channel, feed_name: str, n: int) -> None:
    """Subscribe, then receive ``n`` values, reporting each one or the error it raised."""
    os.environ["SHMFEED_NAMESPACE"] = namespace

    def run(results: shmfeed.Channel) -> None:
        channel: shmfeed.Channel = shmfeed.Channel(capacity=8)
        with shmfeed.Feed(feed_name).subscribe(channel) as sub:
            results.send(("ready",), timeout=WAIT)
            got: list[Any] = []
            for _ in range(n):
                try:
                    got.append(("value", channel.recv(timeout=WAIT)))
                except shmfeed.UnknownTypeError as error:
                    corrupt = isinstance(error, (shmfeed.ChannelCorruptError, shmfeed.SubscriptionFailed))
                    got.append(("unknown", error.type_name, str(error), corrupt))
            try:
                still = sub.err().recv(timeout=0)
                running = f"ended: {still!r}"
            except TimeoutError:
                running = "running"
            results.send(("done", got, running), timeout=WAIT)

    _report(results, run)
