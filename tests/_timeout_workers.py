"""Process targets for ``test_timeouts.py``: a child that holds one of an object's locks.

Module-level so that spawn and forkserver children can import it; the namespace comes
first (a forkserver child inherits the forkserver's environment, not the test's).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import shmfeed
from shmfeed import _layout as L

from _workers import enter_namespace

HOLD_SECONDS = 4.0  # the figure: far longer than the parent's 1 s timeout


def _lock_and_owner_word(obj: Any, which: str) -> tuple[Any, int]:
    """The semaphore and owner word of a channel's send or receive lock, or a feed's send lock."""
    if which == "feed send":
        return obj._open().send_lock, L.SEND_LOCK_OWNER
    core = obj._live_core()
    if which == "send":
        return core.send_lock, L.LOCK_OWNER
    return core.recv_lock, L.RECV_LOCK_OWNER


def _words(obj: Any) -> Any:
    return obj._open().words if isinstance(obj, shmfeed.Feed) else obj._live_core().words


def _take(namespace: str, obj: Any, which: str, held: Any) -> tuple[Any, Any, int]:
    """Take ``which`` lock of ``obj`` as the library does (pid in its owner word); say so."""
    enter_namespace(namespace)
    lock, owner_word = _lock_and_owner_word(obj, which)
    words = _words(obj)
    lock.acquire()
    words[owner_word] = os.getpid()
    held.set()
    return lock, words, owner_word


def hold_lock(namespace: str, obj: Any, which: str, held: Any, release: Any, released: Any) -> None:
    """Take ``which`` lock of ``obj`` as the library does (pid in its owner word), say so
    on ``held``, keep it until ``release`` is set or HOLD_SECONDS pass, let go, say so."""
    lock, words, owner_word = _take(namespace, obj, which, held)
    try:
        release.wait(HOLD_SECONDS)
    finally:
        words[owner_word] = 0
        lock.release()
        released.set()


def hold_lock_until_killed(namespace: str, obj: Any, which: str, held: Any) -> None:
    """Take ``which`` lock of ``obj`` as the library does, say so, and never let go."""
    _take(namespace, obj, which, held)
    signal.pause()  # until killed


def recv_once(namespace: str, channel: shmfeed.Channel, out: Any) -> None:
    """Receive one value from ``channel`` (opened here: unpickled). On the pipe end ``out``:
    ``("calling", pid)`` just before the call, then ``("ok", value)`` or ``("error", text)``."""
    enter_namespace(namespace)
    try:
        out.send(("calling", os.getpid()))
        out.send(("ok", channel.recv(timeout=30)))
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        out.send(("error", f"{type(error).__module__}.{type(error).__name__}: {error}"))
