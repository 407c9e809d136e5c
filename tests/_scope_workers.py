"""Process targets for test_scope (importable, so every start method can run them)."""

from __future__ import annotations

import os
import signal
from typing import Any

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


def hold_scope_lock(namespace: str, name: str, with_owner: bool, ready: Any) -> None:
    """Track one subscription into the named scope, then take the scope's segment lock as
    the library does (``with_owner``: writing LOCK_OWNER; else killed before writing it),
    say so on the ``ready`` pipe and wait to be killed."""
    os.environ["SHMFEED_NAMESPACE"] = namespace
    scope = shmfeed.SubscriptionScope(name)
    scope.track(shmfeed.Feed().subscribe(shmfeed.Channel()))
    shared = scope._shared
    assert shared is not None
    if with_owner:
        shared.acquire()
    else:
        shared.segment_lock.acquire()
    ready.send(os.getpid())
    signal.pause()
