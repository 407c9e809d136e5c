"""Every example runs as a user would run it and prints exactly what its docstring says."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shmfeed import _gc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EXPECTED = {
    "acknowledged_events.py": ["0", "0", "0", "1", "1", "1", "2", "2", "2"],
    "scope.py": ["division happened: 2", "multiplication happened: 12", "subscriber exited"],
    "pool_workers.py": [
        "fan-out: 3 workers each applied 100 updates (total 5050)",
        "work queue: 30 jobs done exactly once by 3 workers",
    ],
    "asyncio_consumer.py": [
        "consumed 10 ticks: 0 1 2 3 4 5 6 7 8 9",
        "the event loop stayed responsive while waiting",
    ],
    "typemux.py": [
        "Received: someEvent(I=5)",
        "Received: someEvent(I=6)",
        "Received: otherEvent(S='whoa')",
    ],
    "resubscribe.py": [
        "got tick 0 from producer 1",
        "got tick 1 from producer 1",
        "got tick 2 from producer 1",
        "killing producer 1",
        "subscription failed (SenderDiedError): subscribing again",
        "got tick 0 from producer 2",
        "got tick 1 from producer 2",
        "got tick 2 from producer 2",
        "producer 2 closed the feed: subscription ended",
    ],
    "demo.py": [
        "subscriber 0: got 1000 prices, total 500500 cents",
        "subscriber 1: got 1000 prices, total 500500 cents",
        "subscriber 2: got 1000 prices, total 500500 cents",
        "work queue: 100 jobs done by 3 workers, sum of squares 328350",
    ],
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_prints_what_it_promises(name, namespace):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True, text=True, timeout=100, env={**os.environ, "SHMFEED_NAMESPACE": namespace},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == EXPECTED[name], result.stdout + result.stderr
    # Pool.__exit__ terminates its workers: the registry cleans up after them within a second.
    deadline = time.monotonic() + 5
    while _gc.namespace_entries(namespace) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_every_example_is_tested():
    assert {path.name for path in EXAMPLES.glob("*.py")} == set(EXPECTED)
