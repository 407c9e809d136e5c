"""How a sender copies a large value into a spill file: ordinary or non-temporal stores.

Ordinary stores leave the value in cache, where a receiver on the other core reads it
about twice as fast, when the two cores share their last-level cache. When they do not
(two vCPUs on different dies; the host moves them as it likes) each ordinary store must
first fetch its line from the other core, and a 1 MiB copy costs ten times as much.
Non-temporal stores (``_accel.copy_into``) go around the cache and cost the same either
way. Neither is right everywhere, so a ``CopyChooser`` times its copies, keeps to the way
that is cheaper here and now, and tries the other way now and then.

An ordinary copy is timed only into a file whose last copy was ordinary too: into one
written by non-temporal stores it pays for fetching every line from memory, which the
steady state does not. So a trial of ordinary stores lasts until files come round again.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Sequence
from typing import Any

ORDINARY, STREAMED = 1, 2  # marks: how a file was last written (None: newly mapped)
FIRST_INTERVAL = 64  # copies between trials of the other way, at first ...
LAST_INTERVAL = 8192  # ... doubling each time a trial confirms the choice, up to this
TRIAL_SAMPLES = 4  # timed copies that settle a trial ...
TRIAL_COPIES = 96  # ... or copies, whichever comes first
# Ordinary stores are kept unless they cost this many times more than non-temporal ones:
# the receiver's cheaper read of a value still in cache does not show in the sender's timing.
ORDINARY_MARGIN = 2.0
WEIGHT = 0.25  # of a new timing in the running average of the way in use


def _ordinary_copy(destination: mmap.mmap, parts: Sequence[bytes | memoryview]) -> None:
    offset = 0
    for part in parts:
        end = offset + len(part)
        destination[offset:end] = part
        offset = end


class CopyChooser:
    """One process's choice of stores for large copies (see the module docstring)."""

    def __init__(self, streaming_copy: Any) -> None:
        self.streaming_copy = streaming_copy  # _accel.copy_into, or None: ordinary only
        self.streaming = streaming_copy is not None  # the way in use (safe where unknown)
        self.cost = {False: 0.0, True: 0.0}  # ns per byte, ordinary / streaming; 0: unknown
        self.interval = FIRST_INTERVAL
        self.until_trial = FIRST_INTERVAL
        self.trial_copies = 0  # > 0: a trial of the other way is under way
        self.trial_costs: list[float] = []

    def copy(self, destination: mmap.mmap, parts: Sequence[bytes | memoryview], mark: int | None) -> int:
        """Copy ``parts``, one after the other, to the start of ``destination``; return the
        file's new mark.

        ``mark`` is what this returned for the file last time, or None if its mapping is
        new (page faults would spoil the timing).
        """
        if self.streaming_copy is None:
            _ordinary_copy(destination, parts)
            return ORDINARY
        streaming = self.streaming != (self.trial_copies > 0)
        started = time.perf_counter_ns()
        if streaming:
            self._streaming_copy(destination, parts)
        else:
            _ordinary_copy(destination, parts)
        elapsed = time.perf_counter_ns() - started
        fair = mark is not None and (streaming or mark == ORDINARY)
        self._learn(streaming, elapsed / max(sum(map(len, parts)), 1) if fair else None)
        return STREAMED if streaming else ORDINARY

    def _streaming_copy(self, destination: mmap.mmap, parts: Sequence[bytes | memoryview]) -> None:
        if len(parts) == 1:
            self.streaming_copy(destination, parts[0])
            return
        with memoryview(destination) as view:
            offset = 0
            for part in parts:
                self.streaming_copy(view[offset:], part)
                offset += len(part)

    def _learn(self, streaming: bool, cost: float | None) -> None:
        if self.trial_copies:
            self.trial_copies += 1
            if cost is not None:
                self.trial_costs.append(cost)
            if len(self.trial_costs) >= TRIAL_SAMPLES or self.trial_copies > TRIAL_COPIES:
                self._settle_trial()
            return
        if cost is not None:
            known = self.cost[streaming]
            self.cost[streaming] = cost if not known else known + WEIGHT * (cost - known)
        self.until_trial -= 1
        if self.until_trial <= 0:
            self.trial_copies, self.trial_costs = 1, []

    def _settle_trial(self) -> None:
        if self.trial_costs:
            self.cost[not self.streaming] = min(self.trial_costs)  # least disturbed by others
        ordinary, streaming = self.cost[False], self.cost[True]
        choice = self.streaming
        if ordinary and streaming:
            choice = ordinary > ORDINARY_MARGIN * streaming
        if choice == self.streaming:
            self.interval = min(self.interval * 2, LAST_INTERVAL)
        else:
            self.streaming, self.interval = choice, FIRST_INTERVAL
        self.trial_copies, self.trial_costs = 0, []
        self.until_trial = self.interval
