"""The choice of stores for large copies (``shmfeed/_largecopy.py``): it follows the costs
it measures, judges ordinary stores only once files come round, and copies exactly."""

from __future__ import annotations

import mmap

import pytest

from shmfeed import _largecopy, _native

SIZE = 1 << 16


class _Costs:
    """A clock for the chooser whose copies cost what the test says, per way."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, ordinary: float, streaming: float) -> None:
        self.cost = {False: ordinary, True: streaming}  # ns per byte
        self.now, self.started, self.streamed = 0, False, False
        self.ways: list[bool] = []  # True: streamed
        monkeypatch.setattr(_largecopy.time, "perf_counter_ns", self)

    def __call__(self) -> int:
        if not self.started:  # a copy starts
            self.started, self.streamed = True, False
            return self.now
        self.started = False
        self.ways.append(self.streamed)
        self.now += int(self.cost[self.streamed] * SIZE)
        return self.now

    def streaming_copy(self, destination: mmap.mmap, payload: bytes) -> None:
        self.streamed = True
        destination[: len(payload)] = payload


def _run(chooser: _largecopy.CopyChooser, copies: int, files: list[mmap.mmap], marks: list) -> None:
    payload = bytes(SIZE)
    for index in range(copies):
        slot = index % len(files)
        marks[slot] = chooser.copy(files[slot], (payload,), marks[slot])


@pytest.mark.timeout(30)
def test_the_chooser_follows_what_each_way_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    costs = _Costs(monkeypatch, ordinary=0.03, streaming=0.03)
    chooser = _largecopy.CopyChooser(costs.streaming_copy)
    files = [mmap.mmap(-1, SIZE) for _ in range(6)]
    marks: list = [None] * len(files)
    assert chooser.streaming  # the safe way until it knows better
    _run(chooser, 400, files, marks)
    assert not chooser.streaming, chooser.cost  # equal costs: ordinary (the receiver reads from cache)
    assert costs.ways[-20:].count(True) == 0  # ... and it sticks to it between trials

    costs.cost[False] = 0.3  # the cores stop sharing a cache: ordinary stores cost 10x
    _run(chooser, 3000, files, marks)
    assert chooser.streaming, chooser.cost
    assert sum(costs.ways[-1000:]) > 900  # trials of ordinary stores are rare by now

    costs.cost[False] = 0.04  # back again: within the margin
    _run(chooser, 20000, files, marks)
    assert not chooser.streaming, chooser.cost
    for file in files:
        file.close()


@pytest.mark.timeout(30)
def test_an_ordinary_copy_over_streamed_lines_is_not_held_against_ordinary_stores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A file last written by non-temporal stores makes the next ordinary copy slow (its lines
    # come from memory); only copies into files the trial itself wrote count.
    costs = _Costs(monkeypatch, ordinary=0.03, streaming=0.03)
    chooser = _largecopy.CopyChooser(costs.streaming_copy)
    files = [mmap.mmap(-1, SIZE) for _ in range(6)]
    marks: list = [None] * len(files)
    payload = bytes(SIZE)
    slow_first = 0
    for index in range(400):
        slot = index % len(files)
        first_ordinary_over_streamed = marks[slot] == _largecopy.STREAMED
        costs.cost[False] = 0.3 if first_ordinary_over_streamed else 0.03
        ordinary_next = chooser.streaming == bool(chooser.trial_copies)
        slow_first += first_ordinary_over_streamed and ordinary_next
        marks[slot] = chooser.copy(files[slot], (payload,), marks[slot])
    assert slow_first > 0  # the trial did meet such files ...
    assert not chooser.streaming, chooser.cost  # ... and did not count them
    for file in files:
        file.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("sizes", [[SIZE + 4], [5, SIZE, 3, 1, SIZE - 7]], ids=["one part", "parts"])
def test_either_way_copies_exactly(streaming: bool, sizes: list[int]) -> None:
    copy_into = _native.accel.copy_into if _native.accel is not None else None
    if streaming and copy_into is None:
        pytest.skip("the C path is not built")
    chooser = _largecopy.CopyChooser(copy_into)
    chooser.streaming = streaming
    destination = mmap.mmap(-1, 3 * SIZE)
    destination[:] = b"\xee" * (3 * SIZE)
    parts = [bytes((n + i) % 256 for i in range(size)) for n, size in enumerate(sizes)]
    payload = b"".join(parts)
    chooser.copy(destination, parts, None)
    assert destination[: len(payload)] == payload
    assert destination[len(payload):] == b"\xee" * (3 * SIZE - len(payload))
    destination.close()
