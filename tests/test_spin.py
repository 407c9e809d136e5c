"""SHMFEED_SPIN_NS: a receiver that spins before it sleeps still uses no measurable CPU
while it waits long, and still gets every value."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shmfeed.testing import wait_until

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


def test_yields_earn_and_spend_credit_and_none_is_tried_blind_once_it_is_spent(namespace: str) -> None:
    import shmfeed

    channel = shmfeed.Channel(4)
    core = channel._live_core()
    state = core._yield_state

    def empty_after(yielded: bool, taken: int, slow: bool = False, woken: bool = False) -> bool:
        core._yielded, core._taken_since_empty, state[2], state[1] = yielded, taken, slow, woken
        return core._should_yield()

    state[0] = 5
    assert empty_after(True, 1) and state[0] == 4  # a quick yield that did not pay costs one
    assert empty_after(True, 3) and state[0] == 5  # one whose drain took several earns one
    assert not empty_after(True, 1, slow=True) and state[0] == 0  # a time slice for nothing: all of it
    # Spent: no blind try however long values keep coming one at a time (ping-pong).
    assert not any(empty_after(False, 1, woken=True) for _ in range(100_000))
    assert not empty_after(False, 5)  # several values, but no sleep before them: no sign
    assert empty_after(False, 2, woken=True) and state[0] == 1  # a wake-up found several: the sender ran on
    assert state[1] is False  # the sign is used once
    channel.close()


@pytest.mark.timeout(60)
def test_a_receiver_woken_to_several_values_learns_to_yield_and_a_ping_pong_stops_yielding(
    namespace: str,
) -> None:
    import shmfeed

    # Ping-pong: each wake-up finds one value, so once the starting credit is spent the
    # receiver goes straight to sleep at every empty.
    ping, pong = shmfeed.Channel(4), shmfeed.Channel(4)
    try:
        answer = threading.Thread(target=lambda: [pong.send(ping.recv()) for _ in range(200)], daemon=True)
        answer.start()
        for i in range(200):
            ping.send(i)
            assert pong.recv(timeout=30) == i
        answer.join(30)
        assert pong._live_core()._yield_state[0] == 0
        # Several values found after a sleep earn credit back.
        core = pong._live_core()
        sender = threading.Thread(target=lambda: [pong.send(i) for i in range(3)])
        waiting = threading.Thread(target=lambda: got.append(pong.recv(timeout=30)))
        got: list[int] = []
        waiting.start()
        wait_until(lambda: pong.statistics().waiting_receivers == 1)
        sender.start()
        sender.join(30)
        waiting.join(30)
        assert got == [0] and pong.recv(timeout=0) == 1 and pong.recv(timeout=0) == 2
        assert core._yield_state[0] == 0  # not judged yet: at the next empty
        with pytest.raises(TimeoutError):
            pong.recv(timeout=0.05)  # finds it empty: judged, and (credit 1) yields before it sleeps
        assert core._yield_state[0] == 1
    finally:
        ping.close()  # also ends the answering thread if an assertion stopped the test
        pong.close()
