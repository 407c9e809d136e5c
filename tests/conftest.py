"""Shared test fixtures: a fresh namespace per test, and a check that nothing leaks."""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
import uuid

import pytest

from shmfeed import _gc, _release
from shmfeed import _layout as L

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
    """What of the namespace is left in /dev/shm, once destructions in progress are done.

    A segment marked DESTROYED is being unlinked right now by some process (the registry
    cleaning up after a child that just exited, say): not a leak, so give it a moment.
    Anything else left is reported at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = _gc.namespace_entries(name)
        segments = [entry for entry in left if not entry.startswith("sem.")]
        if not left or time.monotonic() > deadline or not segments:
            return left
        if not all(_being_destroyed(entry) for entry in segments):
            return left
        time.sleep(0.05)


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
