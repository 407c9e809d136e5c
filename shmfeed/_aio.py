"""Waiting from asyncio without blocking the event loop.

One daemon thread per process and namespace sleeps on one waker semaphore on behalf of
every coroutine that waits. Coroutines register that waker in the wait lists of the
channels they wait on; when it is posted, the thread resolves every pending future, and
each coroutine polls its channel again (a broadcast: cheap, and no wake-up can be lost).
No message is ever taken by the thread, so a cancelled coroutine loses nothing: every
value is taken, and every value written, by the coroutine itself in its event loop's
thread, between two awaits (``wait_ready``).

All coroutines of a process share that one waker, so a wait list holds it once for all of
them. The dispatcher counts the coroutines waiting on each wait list (``enter``/``leave``):
only the last one to leave takes the waker out, and one that leaves while others still
wait posts the waker, so that they poll again and register anew (its own poll may have
taken the waker out of the list on their behalf).

A lock held by another process cannot be waited on through a wait list: ``acquire``
waits for it in a short-lived thread of its own (only when the lock is busy).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Hashable, Iterable, Sequence, TypeVar

from . import _process, _waker

R = TypeVar("R")

# A wait list a coroutine registers the dispatcher's waker in, and how to take it out.
WaitList = tuple[Hashable, Callable[[_waker.Waker], None]]


class _Dispatcher:
    def __init__(self, namespace: str) -> None:
        self.waker = _waker.Waker(namespace)
        self.pending: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        self.lock = threading.Lock()
        self.interest: dict[Hashable, int] = {}  # wait list -> coroutines waiting on it
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="shmfeed-async-waker", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            self.waker.wait(None)
            with self.lock:
                pending, self.pending = self.pending, set()
            for loop, future in pending:
                try:
                    loop.call_soon_threadsafe(_resolve, future)
                except RuntimeError:
                    pass  # that loop is closed

    def future(self) -> "asyncio.Future[None]":
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self.lock:
            self.pending.add((loop, future))
        return future

    def discard(self, future: "asyncio.Future[None]") -> None:
        with self.lock:
            self.pending.discard((future.get_loop(), future))

    def enter(self, keys: Iterable[Hashable]) -> None:
        """A coroutine starts waiting on these wait lists."""
        with self.lock:
            for key in keys:
                self.interest[key] = self.interest.get(key, 0) + 1

    def leave(self, keys: Iterable[Hashable]) -> list[Hashable]:
        """A coroutine stops waiting; returns the wait lists nobody waits on any more.

        If others still wait on one of them, the waker is posted: they poll again.
        """
        last, others = [], False
        with self.lock:
            for key in keys:
                count = self.interest.get(key, 0) - 1
                if count > 0:
                    self.interest[key] = count
                    others = True
                else:
                    self.interest.pop(key, None)
                    last.append(key)
        if others:
            self.waker.post()
        return last

    def stop(self) -> None:
        """End the thread and remove the waker (nothing may wait through it any more)."""
        self.stopping = True
        self.waker.post()
        self.thread.join()
        self.waker.destroy()


async def wait_ready(
    namespace: str,
    attempt: Callable[[_waker.Waker], tuple[bool, R]],
    wait_lists: Sequence[WaitList],
    deadline: float | None,
    on_timeout: Callable[[], BaseException],
) -> R:
    """Call ``attempt(waker)`` until it answers ``(True, result)``; return the result.

    ``attempt`` runs in the event loop's thread and never awaits: it takes (or writes) a
    value, or registers ``waker`` in ``wait_lists`` and answers ``(False, _)``. Between two
    attempts the coroutine awaits a post of the waker, so a cancellation lands only there,
    before anything was taken or written. At ``deadline`` (a ``time.monotonic()`` value)
    it raises ``on_timeout()``, after one last attempt.
    """
    found = dispatcher(namespace)
    keys = [key for key, _ in wait_lists]
    found.enter(keys)
    try:
        while True:
            # The future first: a post that comes after the attempt registered the waker
            # finds it pending, so no wake-up is lost.
            future = found.future()
            try:
                ready, result = attempt(found.waker)
                if ready:
                    return result
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise on_timeout()
                try:
                    await asyncio.wait_for(future, remaining)
                except asyncio.TimeoutError:
                    pass  # one more attempt, then on_timeout
            finally:
                found.discard(future)
    finally:
        last = set(found.leave(keys))
        for key, forget in wait_lists:
            if key in last:
                forget(found.waker)


async def acquire(lock: Any, deadline: float | None) -> bool:
    """Take a lock another process may hold without blocking the event loop.

    ``lock`` is a ``_shm.Semaphore``. Free, it is taken at once; busy, a thread of its own
    waits for it (``acquire_by(deadline)``). False if it was still taken at ``deadline``.
    A coroutine cancelled meanwhile does not get the lock: if the thread takes it after
    all, it gives it back.
    """
    if lock.acquire_by(0.0):  # a deadline long past: one attempt, no wait
        return True
    loop = asyncio.get_running_loop()
    taken: asyncio.Future[bool] = loop.create_future()

    def wait_in_thread() -> None:
        try:
            outcome: Any = bool(lock.acquire_by(deadline))
        except BaseException as error:  # noqa: BLE001 - handed to the coroutine
            outcome = error
        try:
            loop.call_soon_threadsafe(_settle_acquire, taken, outcome, lock)
        except RuntimeError:  # the loop is closed: nobody will use the lock
            if outcome is True:
                lock.release()

    threading.Thread(target=wait_in_thread, name="shmfeed-async-lock", daemon=True).start()
    try:
        return await asyncio.shield(taken)
    except asyncio.CancelledError:
        # Not ours any more: whatever the thread gets, it goes back (_settle_acquire).
        taken.cancel()
        if taken.done() and not taken.cancelled() and taken.exception() is None and taken.result():
            lock.release()
        raise


def _settle_acquire(taken: "asyncio.Future[bool]", outcome: Any, lock: Any) -> None:
    if taken.done():  # the waiting coroutine was cancelled: give the lock back
        if outcome is True:
            lock.release()
    elif isinstance(outcome, BaseException):
        taken.set_exception(outcome)
    else:
        taken.set_result(outcome)


def _resolve(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


_dispatchers: dict[str, _Dispatcher] = {}
_dispatchers_lock = threading.Lock()


def dispatcher(namespace: str) -> _Dispatcher:
    """The process's async dispatcher for ``namespace`` (started on first use)."""
    found = _dispatchers.get(namespace)
    if found is None:
        with _dispatchers_lock:
            found = _dispatchers.get(namespace)
            if found is None:
                found = _dispatchers[namespace] = _Dispatcher(namespace)
    return found


def stop(namespace: str | None = None) -> None:
    """Stop the dispatchers of ``namespace`` (of all namespaces if None)."""
    with _dispatchers_lock:
        chosen = [ns for ns in _dispatchers if namespace is None or ns == namespace]
        stopping = [_dispatchers.pop(ns) for ns in chosen]
    for found in stopping:
        found.stop()


def _forget_after_fork() -> None:
    global _dispatchers_lock
    _dispatchers.clear()
    _dispatchers_lock = threading.Lock()


_process.on_fork_child(_forget_after_fork)
_process.on_exit(stop)
