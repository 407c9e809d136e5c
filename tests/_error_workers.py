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


# --- set_namespace -----------------------------------------------------------------------


def app_main(app_namespace: str, pipe: Any) -> None:
    """A program's main: choose its namespace first, then use a feed and start a child."""
    import multiprocessing

    try:
        shmfeed.set_namespace(app_namespace)
        shmfeed.set_namespace(app_namespace)  # again, same name: harmless
        outcome: dict[str, Any] = {"env": os.environ.get("SHMFEED_NAMESPACE")}
        feed = shmfeed.Feed("events")
        channel: shmfeed.Channel = shmfeed.Channel(capacity=4)
        with feed.subscribe(channel):
            try:
                shmfeed.set_namespace(app_namespace + "-other")
                outcome["late"] = "accepted"
            except RuntimeError as error:
                outcome["late"] = str(error)
            child_end, here = multiprocessing.get_context("spawn").Pipe()
            child = multiprocessing.get_context("spawn").Process(target=app_child, args=(child_end,))
            child.start()
            outcome["child"] = here.recv()  # the namespace the child found, after its send
            outcome["received"] = channel.recv(timeout=WAIT)
            child.join(WAIT)
            outcome["child_exit"] = child.exitcode
        feed.close()
        channel.close()
        pipe.send(("done", outcome))
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        raise


def app_child(pipe: Any) -> None:
    """A spawn child of that program: it chose nothing, and is in the program's namespace."""
    from shmfeed import _names

    try:
        sent = shmfeed.Feed("events").send("hello from the child", timeout=WAIT)
        pipe.send((_names.current_namespace(), sent))
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        raise
