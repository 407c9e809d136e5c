"""Whether this machine has a CPU to spare now: the condition for a receiver's spin
before it sleeps (``_ring.ChannelCore._spin``).

A spinning receiver answers within microseconds instead of a sleep and a wake-up, but it
holds a CPU: where every CPU is wanted (a sender and several receivers on two cores, or
other work on the machine) that CPU is taken from the process that would send, and a
fan-out's throughput halved (measured). So a receiver spins only while the tasks the
kernel has running or ready are no more than the CPUs this process may use: the count
``/proc/loadavg`` gives (its fourth field, ``running/total``, counts the reader itself).
It is read at most every ``REFRESH_NS``; the answer in between is the last one.
"""

from __future__ import annotations

import os
import time

REFRESH_NS = 10_000_000  # 10 ms: a read costs a few microseconds
LOADAVG = "/proc/loadavg"

_last = [0, False]  # when it was read (perf_counter_ns), the answer


def spare() -> bool:
    """Whether the runnable tasks are no more than this process's CPUs (as of the last
    read, at most ``REFRESH_NS`` ago); False if that cannot be known."""
    now = time.perf_counter_ns()
    if now - _last[0] < REFRESH_NS:
        return bool(_last[1])
    _last[0] = now
    _last[1] = answer = _runnable() <= _cpus()
    return answer


def _runnable() -> int:
    try:
        with open(LOADAVG, "rb") as file:
            fields = file.read(128).split()
        return int(fields[3].split(b"/")[0])
    except (OSError, IndexError, ValueError):
        return 1 << 30  # not known: no spin


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1
