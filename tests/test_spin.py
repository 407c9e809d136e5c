"""SHMFEED_SPIN_NS: a receiver that spins before it sleeps still uses no measurable CPU
while it waits long, and still gets every value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent

WAITER = """
import resource, sys, threading, time, shmfeed
from shmfeed import _ring
assert _ring.SPIN_MAX_NS == 40000, _ring.SPIN_MAX_NS
channel = shmfeed.Channel(16)
def later():
    for n in range(20):
        time.sleep(0.1)
        channel.send(n)
threading.Thread(target=later, daemon=True).start()
before = resource.getrusage(resource.RUSAGE_SELF)
got = [channel.recv(10) for _ in range(20)]
after = resource.getrusage(resource.RUSAGE_SELF)
assert got == list(range(20)), got
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
print(f"{cpu:.4f}")
channel.close()
"""


def test_a_spinning_receiver_waiting_two_seconds_uses_almost_no_cpu(namespace: str) -> None:
    result = subprocess.run([sys.executable, "-c", WAITER], capture_output=True, text=True, timeout=50,
                            env={**os.environ, "SHMFEED_SPIN_NS": "40000", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    cpu = float(result.stdout.strip())
    # 20 receives 0.1 s apart: the spins that do not pay shrink to nothing; the sender
    # thread's own work is in the figure too. Busy-waiting would be about 2 s.
    assert cpu < 0.1, f"{cpu:.3f} s of CPU while waiting 2 s"


def test_the_spare_cpu_answer_follows_the_runnable_count_and_is_reread_after_its_refresh(monkeypatch) -> None:
    from shmfeed import _spare_cpu

    counts = iter([1, 99])
    monkeypatch.setattr(_spare_cpu, "_runnable", lambda: next(counts))
    monkeypatch.setattr(_spare_cpu, "_cpus", lambda: 2)
    monkeypatch.setattr(_spare_cpu, "_last", [0, False])
    assert _spare_cpu.spare() is True  # 1 runnable task on 2 CPUs
    assert _spare_cpu.spare() is True  # within REFRESH_NS: not read again
    _spare_cpu._last[0] -= _spare_cpu.REFRESH_NS
    assert _spare_cpu.spare() is False  # read again: 99 runnable


def test_a_yield_that_took_a_time_slice_for_nothing_makes_the_probes_rarer(namespace: str) -> None:
    import shmfeed
    from shmfeed import _ring

    channel = shmfeed.Channel(4)
    core = channel._live_core()
    state = core._yield_state
    state[0] = 0  # no credit left: only probes yield
    core._yielded, core._taken_since_empty, state[3] = True, 1, True  # slow, and one value after it
    core._should_yield()
    assert state[2] == _ring.YIELD_PROBE_EVERY * _ring.YIELD_BACKOFF and state[0] == 0
    state[0] = 5  # with credit left (yields pay often: a fan-out), a slow miss costs one credit only
    core._yielded, core._taken_since_empty, state[3] = True, 1, True
    core._should_yield()
    assert state[0] == 4 and state[2] == _ring.YIELD_PROBE_EVERY * _ring.YIELD_BACKOFF
    state[0] = 0
    core._yielded, core._taken_since_empty = True, 5  # a yield that paid: probes as often as before
    core._should_yield()
    assert state[2] == _ring.YIELD_PROBE_EVERY and state[0] == 1
    channel.close()
