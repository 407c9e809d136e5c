"""Waiting from asyncio without blocking the event loop.

One daemon thread per process and namespace sleeps on one waker semaphore on behalf of
every coroutine that waits. Coroutines register that waker in the wait lists of the
channels they wait on; when it is posted, the thread resolves every pending future, and
each coroutine polls its channel again (a broadcast: cheap, and no wake-up can be lost).
No message is ever taken by the thread, so a cancelled coroutine loses nothing.
"""

from __future__ import annotations

import asyncio
import threading

from . import _process, _waker


class _Dispatcher:
    def __init__(self, namespace: str) -> None:
        self.waker = _waker.Waker(namespace)
        self.pending: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        self.lock = threading.Lock()
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


    def stop(self) -> None:
        """End the thread and remove the waker (nothing may wait through it any more)."""
        self.stopping = True
        self.waker.post()
        self.thread.join()
        self.waker.destroy()


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
