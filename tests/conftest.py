"""Shared test fixtures: a fresh namespace per test, and a check that nothing leaks."""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
import uuid
from typing import Iterator

import psutil
import pytest

from shmfeed import _gc, _names, _release
from shmfeed import _layout as L

import _attacker

START_METHODS = ["fork", "spawn", "forkserver"]


@pytest.fixture(autouse=True)
def namespace(monkeypatch: pytest.MonkeyPatch):
    """Each test runs in its own SHMFEED_NAMESPACE and must leave /dev/shm clean."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("SHMFEED_NAMESPACE", name)
    monkeypatch.setenv("SHMFEED_REGISTRY_IDLE", "0.5")  # test registries leave soon after
    yield name
    gc.collect()
    _release.release_namespace(name)
    left = _wait_out_destruction(name)
    if left:
        _gc.sweep(name)  # do not let one test's leak fail the next
        _force_remove(name)
    assert not left, f"left in /dev/shm: {left}"


def _wait_out_destruction(name: str, timeout: float = 5.0) -> list[str]:
    """What of the namespace is left in /dev/shm, once cleanups in progress are done.

    A segment marked DESTROYED is being unlinked right now by some process, and the waker,
    pool files and pins of a dead process (a pool worker a Pool terminated, say) are the
    registry's to remove once it notices the death: neither is a leak, so give them a
    moment. Anything else left is reported at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = _gc.namespace_entries(name)
        if not left or time.monotonic() > deadline:
            return left
        if not all(_being_cleaned(name, entry) for entry in left):
            return left
        time.sleep(0.05)


def _being_cleaned(namespace: str, entry: str) -> bool:
    parsed = _names.parse_entry(namespace, entry)
    if parsed is not None and parsed.kind in _gc.PER_PROCESS_KINDS:
        return not psutil.pid_exists(parsed.pid)  # a dead process's: the registry removes it
    if parsed is not None and parsed.kind is _names.EntryKind.LOCK:
        return True  # a lock: goes with its segment, judged by that
    return _being_destroyed(entry)


def _being_destroyed(entry: str) -> bool:
    try:
        with open(f"/dev/shm/{entry}", "rb") as segment:
            header = segment.read(L.HEADER_BYTES)
    except FileNotFoundError:
        return True
    return len(header) == L.HEADER_BYTES and header[L.DESTROYED * 8] != 0


def _force_remove(name: str) -> None:
    for entry in _gc.namespace_entries(name):
        try:
            os.unlink(f"/dev/shm/{entry}")
        except FileNotFoundError:
            pass


@pytest.fixture(params=START_METHODS)
def mp_context(request: pytest.FixtureRequest, namespace: str) -> multiprocessing.context.BaseContext:
    """A multiprocessing context for each start method.

    The forkserver keeps the environment it was started with, so it is restarted to let
    its children see this test's SHMFEED_NAMESPACE.
    """
    if request.param == "forkserver":
        from multiprocessing import forkserver

        forkserver._forkserver._stop()
    return multiprocessing.get_context(request.param)


@pytest.fixture(params=["c", "python"])
def data_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The C hot path, or the Python one (what SHMFEED_PURE_PYTHON=1 gives) for the
    channels and feeds a test makes."""
    from shmfeed import _ring

    if request.param == "c":
        if _ring._accel is None:
            pytest.skip("the C path is not built")
    else:
        monkeypatch.setattr(_ring, "_accel", None)
    return str(request.param)


@pytest.fixture
def other_user_turn() -> Iterator[None]:
    """For a test that acts as, or plants files of, another user: one such test at a time
    (see ``_attacker.turn``)."""
    with _attacker.turn():
        yield
