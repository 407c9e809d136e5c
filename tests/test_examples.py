"""Every example runs as a user would run it and prints exactly what its docstring says;
the README's excerpts of examples are in them, as shown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shmfeed import _gc
from shmfeed.testing import wait_until

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
    "worker_subscribes.py": [
        "worker 0: 100 updates, total 5050",
        "worker 1: 100 updates, total 5050",
    ],
    "ending_consumers.py": [
        "closed channel: the consumer took 10 values, then its loop ended",
        "sentinel: 3 consumers took 30 jobs, then one None each",
        "ended subscription: the consumer took 10 values, then its loop ended",
    ],
    "module_level_subscribe.py": [
        "3 subscriptions: the parent's and one per worker",
        "64 sends delivered",
        "send 65 timed out: delivered to 1 channel, 2 not read by anyone",
    ],
    "two_hosts.py": [
        "host B got ('ACME', 101.25)",
        "host B got ('ACME', 101.5)",
        "host B got ('INITECH', 7.0)",
        "bridges and nats-server stopped",
    ],
    "demo.py": [
        "subscriber 0: got 1000 prices, total 500500 cents",
        "subscriber 1: got 1000 prices, total 500500 cents",
        "subscriber 2: got 1000 prices, total 500500 cents",
        "work queue: 100 jobs done by 3 workers, sum of squares 328350",
    ],
}


NATS_EXAMPLE = "two_hosts.py"  # needs nats-py and nats-server; its own test below


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {NATS_EXAMPLE}))
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


@pytest.mark.timeout(60)
def test_two_hosts_joins_two_namespaces_through_nats(namespace):
    """The example runs its own nats-server and two bridges, in two namespaces named after
    the test's, and leaves nothing of either behind."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / NATS_EXAMPLE)],
        capture_output=True, text=True, timeout=30, env={**os.environ, "SHMFEED_NAMESPACE": namespace},
    )
    assert result.returncode == 0, result.stderr
    if result.stdout.startswith("skipped:"):
        pytest.skip(result.stdout.strip())
    assert result.stdout.splitlines() == EXPECTED[NATS_EXAMPLE], result.stdout + result.stderr
    hosts = [f"{namespace}-host-a", f"{namespace}-host-b"]
    wait_until(lambda: not any(_gc.namespace_entries(host) for host in hosts), timeout=5,
               what="nothing of the two hosts' namespaces left in /dev/shm")


def test_every_example_is_tested():
    assert {path.name for path in EXAMPLES.glob("*.py")} == set(EXPECTED)


README = EXAMPLES.parent / "README.md"


def _excerpts() -> list[tuple[str, list[str]]]:
    """The README's code blocks that start with ``# examples/<name>.py``: (name, lines)."""
    blocks = re.findall(r"```python\n# examples/(\S+\.py)\n(.*?)```", README.read_text(), re.S)
    return [(name, body.splitlines()) for name, body in blocks]


def test_the_readme_has_excerpts_of_examples():
    assert {name for name, _ in _excerpts()} >= {"worker_subscribes.py", "pool_workers.py",
                                                 "module_level_subscribe.py", "ending_consumers.py"}


@pytest.mark.parametrize("name, lines", _excerpts(), ids=[name for name, _ in _excerpts()])
def test_a_readme_excerpt_is_in_its_example(name, lines):
    """Each line of the excerpt is a line of the example, in the same order; ``...`` skips."""
    source = (EXAMPLES / name).read_text().splitlines()
    position = 0
    for line in lines:
        if line.strip() == "...":
            continue
        assert line in source[position:], f"not in examples/{name} (after line {position}): {line!r}"
        position = source.index(line, position) + 1
