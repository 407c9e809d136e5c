"""Process targets for test_scope (importable, so every start method can run them)."""

from __future__ import annotations

import os

import shmfeed


def track_and_wait(namespace: str, results: shmfeed.Channel, go: shmfeed.Channel) -> None:
    os.environ["SHMFEED_NAMESPACE"] = namespace
    scope = shmfeed.SubscriptionScope("job-42")
    sub = scope.track(shmfeed.Feed("jobs").subscribe(shmfeed.Channel()))
    results.send("tracked")
    ended = sub.err().recv(timeout=30) is None
    results.send("ended" if ended else "still running")
    go.recv(timeout=30)


def close_scope(namespace: str, name: str) -> None:
    os.environ["SHMFEED_NAMESPACE"] = namespace
    shmfeed.SubscriptionScope(name).close()
