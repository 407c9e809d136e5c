"""Process targets for test_overflow: a deliberately slow receiver."""

from __future__ import annotations

import time

import shmfeed


def slow_receiver(channel: shmfeed.Channel, ready: shmfeed.Channel, results: shmfeed.Channel) -> None:
    ready.send("ready")
    got = []
    for value in channel:  # until closed
        got.append(value)
        time.sleep(0.002)  # a slow consumer, on purpose
    results.send(got)
