"""Wakers: one named semaphore per waiting thread, posted by whoever makes progress.

A thread that must wait (for a message, for space, for any of several channels in
``select``) writes its waker id into the wait lists of the objects it waits on, under each
object's lock, then sleeps on its own semaphore. Whoever changes such an object, under the
same lock, posts every waker in the list and clears the list. Because the check and the
registration happen under the lock, and the post happens under the lock, no wake-up is lost;
a late post only causes one spurious wake-up, and every waiter loops and re-checks.

The waker id is the owner's pid and 32 random bits; the semaphore name is derived from it,
so a stale cached handle practically never points at another thread's semaphore (pids are
reused, random bits with them are not), and cleanup can tell whose a leftover waker was.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any

import posix_ipc

from . import _names, _process, _registry_client, _shm

_POST_CACHE_SIZE = 256
_libc = _shm.libc
_native_wait = _shm.native_wait  # sleeps so that signal handlers run and may raise

WATCHDOG_SECONDS = 0.25


class Waker:
    """The semaphore one thread sleeps on."""

    __slots__ = ("waker_id", "namespace", "name", "pid", "semaphore", "handle", "__weakref__")

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        # The pid in the high half lets cleanup tell which process a leftover belonged to.
        self.waker_id = _names.new_waker_id(os.getpid())
        self.name = _names.waker_semaphore(namespace, self.waker_id)
        self.pid = os.getpid()
        self.semaphore = _shm.create_semaphore(self.name, 0)
        try:
            self.handle: Any = _shm.open_native(self.name)  # None once destroyed
        except BaseException:
            self.semaphore.unlink()
            raise
        _live_wakers.add(self)

    def wait(self, timeout: float | None) -> bool:
        """Sleep until posted or ``timeout`` seconds pass; True if posted.

        A long sleep wakes every ``WATCHDOG_SECONDS`` to make sure the namespace's registry
        runs: what this thread waits for may hang on a death only the registry repairs (a
        full channel's reader killed), and a registry killed too must come back.
        """
        if not self.handle:
            raise _shm.SharedObjectError(
                "shmfeed: this waker was destroyed (the namespace was released); do not use a released namespace"
            )
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= WATCHDOG_SECONDS:
                return _native_wait(self.handle, max(0.0, remaining))
            if _native_wait(self.handle, WATCHDOG_SECONDS):
                return True
            _registry_client.ensure_running(self.namespace)

    def drain(self) -> None:
        """Swallow posts that arrived after the waiter stopped listening."""
        while _libc.sem_trywait(self.handle) == 0:
            pass

    def post(self) -> None:
        self.semaphore.release()

    def destroy(self) -> None:
        """Unlink the semaphore (ours only) and close it, except at exit: a daemon thread
        may still sleep on it then, and closing it under that thread crashes the process."""
        if self.pid == os.getpid():
            _shm.unlink_semaphore(self.name)
        if _process.exiting():
            return
        if self.handle:
            _libc.sem_close(self.handle)
            self.handle = None
        try:
            self.semaphore.close()
        except posix_ipc.Error:
            pass


class _ThreadWakers(dict):  # type: ignore[type-arg]
    """This thread's wakers by namespace (a dict subclass, so it can be weakly referenced)."""


_live_wakers: "weakref.WeakSet[Waker]" = weakref.WeakSet()
_local = threading.local()
_post_cache: "OrderedDict[tuple[str, int], posix_ipc.Semaphore]" = OrderedDict()
_post_cache_lock = threading.Lock()


def current_waker(namespace: str) -> Waker:
    """This thread's waker for ``namespace`` (created on first use, rebuilt after fork)."""
    wakers: _ThreadWakers | None = getattr(_local, "wakers", None)
    if wakers is None:
        wakers = _local.wakers = _ThreadWakers()
    waker = wakers.get(namespace)
    if waker is None or waker.pid != _process.pid():
        waker = Waker(namespace)
        wakers[namespace] = waker
        # A thread's wakers are unlinked when the thread ends (its locals are collected);
        # not by weakref's own atexit pass, which would run before our exit hooks.
        weakref.finalize(wakers, waker.destroy).atexit = False
    return waker


def post(namespace: str, waker_id: int) -> None:
    """Wake the thread owning ``waker_id``; a waker that is gone is ignored."""
    key = (namespace, waker_id)
    with _post_cache_lock:
        semaphore = _post_cache.get(key)
        if semaphore is not None:
            _post_cache.move_to_end(key)
    if semaphore is None:
        try:
            semaphore = _shm.open_semaphore(_names.waker_semaphore(namespace, waker_id))
        except _shm.ForeignObjectError:
            return  # planted at the name of a waker that is gone: nobody of ours to wake
        if semaphore is None:
            return
        with _post_cache_lock:
            _post_cache[key] = semaphore
            while len(_post_cache) > _POST_CACHE_SIZE:
                _, old = _post_cache.popitem(last=False)
                _close_quietly(old)
    try:
        semaphore.release()
    except posix_ipc.Error:
        pass


def _close_quietly(semaphore: posix_ipc.Semaphore) -> None:
    try:
        semaphore.close()
    except posix_ipc.Error:
        pass


def destroy_wakers(namespace: str | None = None) -> None:
    """Remove this process's wakers of ``namespace`` (all if None); none may be waited on."""
    for waker in list(_live_wakers):
        if namespace is None or waker.name.startswith(f"/{_names.prefix(namespace)}"):
            waker.destroy()
            _live_wakers.discard(waker)
    wakers = getattr(_local, "wakers", None)
    if wakers is not None:
        for key in [k for k in wakers if namespace is None or k == namespace]:
            del wakers[key]


def _forget_parent_state() -> None:
    # The parent's wakers belong to the parent; the child makes its own on demand.
    global _local, _post_cache_lock
    _local = threading.local()
    _post_cache_lock = threading.Lock()
    _live_wakers.clear()


_process.on_exit(destroy_wakers)
_process.on_fork_child(_forget_parent_state)
