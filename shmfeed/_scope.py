"""``SubscriptionScope``: end many subscriptions at once, in one process or across many.

A scope without a name lives in its process until the process forks: then (just before
the fork) it becomes shared under a hidden name, so that parent and children use one scope.
A named scope is one shared-memory segment
(layout in ``_layout``): a closed flag, a count, and one entry per tracked subscription
of any process. Each process that tracks into a named scope runs one watcher thread that
sleeps on a waker in the scope's wait list; closing the scope from any process wakes every
watcher, and each ends its own process's tracked subscriptions. The registry removes the
entries of processes that died.
"""

from __future__ import annotations

import itertools
import mmap
import threading
import weakref
from typing import Any, Iterator

from . import _layout as L
from ._segment import AttachedSegment, open_named
from . import _names, _process, _registry_client, _ring, _shm, _waker
from ._errors import ShmfeedError, TableFullError
from ._subscription import ErrorChannel, Subscription

_OPEN_ATTEMPTS = 100
_local_ids = itertools.count(1)


class ScopeSubscription(Subscription):
    """The wrapper ``SubscriptionScope.track`` returns; unsubscribing it leaves the scope."""

    def __init__(self, scope: "SubscriptionScope", inner: Subscription, local_id: int) -> None:
        self._scope = scope
        self._inner = inner
        self._local_id = local_id
        self._lock = threading.Lock()
        self._done = False

    def err(self) -> ErrorChannel:
        return self._inner.err()

    def unsubscribe(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._scope._untrack(self._local_id)
        self._inner.unsubscribe()

    def __iter__(self) -> Iterator[Any]:
        """Iterate the tracked subscription (see ``Feed.subscribe``'s subscription)."""
        return iter(self._inner)  # type: ignore[call-overload]

    def _end(self) -> None:
        """The scope closed: end the inner subscription (the scope forgets us itself)."""
        with self._lock:
            if self._done:
                return
            self._done = True
        self._inner.unsubscribe()

    def __repr__(self) -> str:
        return f"<shmfeed.Subscription tracked by a scope: {self._inner!r}>"


class SubscriptionScope:
    """Tracks subscriptions so that they can all be ended together (geth's SubscriptionScope).

    ``SubscriptionScope()`` is ready to use and lives in this process.
    ``SubscriptionScope("job-42")`` is shared by every process of the namespace that opens
    that name: ``count()`` counts the subscriptions tracked by all of them, and ``close()``
    from any of them ends them all (their ``err()`` closes in every process).
    A scope is a context manager that closes it on exit.
    """

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            _names.validate_name(name, what="scope name", limit=L.FEED_NAME_MAX)
        self._name = name
        self._namespace = _names.current_namespace()
        self._lock = threading.Lock()
        self._tracked: dict[int, ScopeSubscription] = {}
        self._closed = False
        self._shared = _SharedScope.open(self._namespace, name) if name is not None else None
        if self._shared is not None:
            self._shared.members.add(self)
        else:
            _local_scopes.add(self)

    def _share(self) -> None:
        """Before a fork: move this process-local scope into shared memory (hidden name)."""
        with self._lock:
            if self._shared is not None or self._closed:
                return
            shared = _SharedScope.open(self._namespace, f"anonymous {_names.new_id():016x}")
            shared.members.add(self)
            for local_id in self._tracked:
                shared.add(local_id, watch=False)  # the watcher starts after the fork
            self._shared = shared

    @property
    def name(self) -> str | None:
        return self._name

    def track(self, sub: Subscription) -> Subscription | None:
        """Track ``sub``; returns a wrapper, or None if the scope is closed.

        Unsubscribing the wrapper unsubscribes ``sub`` and removes it from the scope.

        Raises:
            TypeError: ``sub`` is not a Subscription.
        """
        if not isinstance(sub, Subscription):
            raise TypeError(f"shmfeed: track takes a Subscription, got {type(sub).__name__}; pass what subscribe() returned")
        local_id = next(_local_ids)
        wrapper = ScopeSubscription(self, sub, local_id)
        with self._lock:
            if self._closed:
                return None
            if self._shared is not None and not self._shared.add(local_id):
                self._closed = True
                return None
            self._tracked[local_id] = wrapper
        return wrapper

    def _untrack(self, local_id: int) -> None:
        with self._lock:
            present = self._tracked.pop(local_id, None) is not None
        if present and self._shared is not None:
            self._shared.remove(local_id)

    def close(self) -> None:
        """Unsubscribe every tracked subscription (of every process, for a named scope).

        Later ``track`` calls return None. Closing twice is fine.
        """
        if self._shared is not None:
            self._shared.close()  # our own watcher ends our tracked subscriptions too
        self._end_local()

    def _end_local(self) -> None:
        with self._lock:
            self._closed = True
            tracked, self._tracked = list(self._tracked.values()), {}
        for wrapper in tracked:
            wrapper._end()

    def count(self) -> int:
        """How many subscriptions are tracked (by every process, for a named scope)."""
        if self._shared is not None:
            return self._shared.count()
        with self._lock:
            return len(self._tracked)

    @property
    def closed(self) -> bool:
        if self._shared is not None and self._shared.closed:
            return True
        return self._closed

    def __enter__(self) -> "SubscriptionScope":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        label = repr(self._name) if self._name is not None else "local"
        return f"<shmfeed.SubscriptionScope {label} count={self.count()}>"


SubscriptionScope.__module__ = "shmfeed"


class _SharedScope(AttachedSegment):
    """This process's attachment to a named scope's segment, and its watcher thread."""

    kind = L.SCOPE_KIND

    def __init__(self, namespace: str, name: str, segment_name: str, mapping: mmap.mmap, lock: Any) -> None:
        self._setup_segment(namespace, segment_name, mapping)
        self.name = name
        self.table = self.buffer[L.HEADER_BYTES : L.SCOPE_SEGMENT_BYTES].cast("Q")
        self.lock = self.segment_lock = lock
        self.members: "weakref.WeakSet[SubscriptionScope]" = weakref.WeakSet()
        self.watcher: threading.Thread | None = None
        self.waker: _waker.Waker | None = None
        self.stopping = False

    @classmethod
    def open(cls, namespace: str, name: str) -> "_SharedScope":
        known = _shared.get((namespace, name))
        if known is not None and not known.released:
            return known
        segment_name = _names.scope_segment(namespace, name, _shm.is_foreign)
        for _ in range(_OPEN_ATTEMPTS):
            scope = cls._attach(namespace, name, segment_name) or cls._create(namespace, name, segment_name)
            if scope is not None:
                _shared[(namespace, name)] = scope
                _registry_client.ensure_running(namespace)
                return scope
        raise ShmfeedError(f"shmfeed: could not open or create scope {name!r}; try again")

    @classmethod
    def _attach(cls, namespace: str, name: str, segment_name: str) -> "_SharedScope | None":
        opened = open_named(namespace, segment_name, cls.kind)
        if opened is None:
            return None
        mapping, (lock,) = opened
        scope = cls(namespace, name, segment_name, mapping, lock)
        if not scope.join():
            scope._close_local()
            return None
        return scope

    @classmethod
    def map_unattached(
        cls, namespace: str, segment_name: str, lock_timeout: float = _ring.RECOVERY_LOCK_TIMEOUT
    ) -> "_SharedScope | None":
        """Map a scope without joining its attach slots (for the registry and gc): its lock
        gives up after ``lock_timeout`` seconds with ``_shm.LockBusy``.

        Raises:
            ShmfeedError: the segment is too small or not a scope.
        """
        opened = open_named(namespace, segment_name, cls.kind)
        if opened is None:
            return None
        mapping, (lock,) = opened
        scope = cls(namespace, "", segment_name, mapping, _shm.BoundedLock(lock, lock_timeout))
        scope.name = L.read_text(scope.buffer, L.FEED_NAME_OFFSET, int(scope.words[L.SCOPE_NAME_LEN]), L.FEED_NAME_MAX)
        scope.attached = False
        return scope

    @classmethod
    def _create(cls, namespace: str, name: str, segment_name: str) -> "_SharedScope | None":
        lock_id = _names.new_id()
        lock_name = _names.lock_semaphore(namespace, lock_id)
        lock = _shm.create_semaphore(lock_name, 1)

        def initialise(mapping: mmap.mmap) -> None:
            buffer = memoryview(mapping)
            words = buffer[: L.HEADER_BYTES].cast("Q")
            L.init_common(words, L.SCOPE_MAGIC, lock_id)
            words[L.SCOPE_NAME_LEN] = L.write_text(buffer, L.FEED_NAME_OFFSET, L.FEED_NAME_MAX, name)
            words.release()
            buffer.release()

        mapping = None
        try:
            mapping = _shm.create_segment(segment_name, L.SCOPE_SEGMENT_BYTES, initialise)
        finally:
            if mapping is None:  # failed, or another process published the scope first
                _shm.unlink_semaphore(lock_name)
                lock.close()
        if mapping is None:
            return None
        return cls(namespace, name, segment_name, mapping, lock)

    def describe(self) -> str:
        return f"scope {self.name!r}"

    # --- entries ----------------------------------------------------------------------------

    def add(self, local_id: int, watch: bool = True) -> bool:
        """Record one tracked subscription of this process; False if the scope is closed.

        ``watch=False`` leaves starting the watcher thread to the caller.
        """
        self.check_usable()
        pid, ticks = _process.identity()
        self._ensure_waker()
        self.acquire()
        try:
            if self.words[L.SCOPE_CLOSED]:
                return False
            self._check_watcher_room()
            table = self.table
            for word in range(0, L.SCOPE_SLOTS * L.SCOPE_ENTRY_WORDS, L.SCOPE_ENTRY_WORDS):
                if not table[word + 3]:
                    table[word], table[word + 1], table[word + 2], table[word + 3] = pid, ticks, local_id, 1
                    self.words[L.SCOPE_COUNT] += 1
                    break
            else:
                raise TableFullError(
                    f"shmfeed: scope {self.name!r} already tracks {L.SCOPE_SLOTS} subscriptions, the most it can; "
                    f"end some first, or use more scopes"
                )
        finally:
            self.release_lock()
        if watch:
            self._ensure_watcher()
        return True

    def _check_watcher_room(self) -> None:
        """Refuse a process whose watcher would not fit the wait list (lock held).

        The watcher's waker is listed here already, so that it cannot lose its place: a
        closing process posts and clears the list, and only then does a watcher leave.
        """
        waker = self.waker
        assert waker is not None
        listed = range(L.SCOPE_WAITLIST_WORD, L.SCOPE_WAITLIST_WORD + L.WAITLIST_SLOTS)
        if any(self.words[word] == waker.waker_id for word in listed):
            return
        if not L.waitlist_add(self.words, L.SCOPE_WAITLIST_WORD, L.SCOPE_WAITING, waker.waker_id):
            raise TableFullError(
                f"shmfeed: {L.WAITLIST_SLOTS} processes already watch scope {self.name!r}, the most its "
                f"wait list holds; track its subscriptions from fewer processes"
            )

    def remove(self, local_id: int) -> None:
        pid, ticks = _process.identity()
        self.acquire()
        try:
            table = self.table
            for word in range(0, L.SCOPE_SLOTS * L.SCOPE_ENTRY_WORDS, L.SCOPE_ENTRY_WORDS):
                if table[word + 3] and table[word] == pid and table[word + 1] == ticks and table[word + 2] == local_id:
                    table[word + 3] = 0
                    self.words[L.SCOPE_COUNT] -= 1
                    break
        finally:
            self.release_lock()

    def count(self) -> int:
        return int(self.words[L.SCOPE_COUNT])

    @property
    def closed(self) -> bool:
        return bool(self.words[L.SCOPE_CLOSED])

    def close(self) -> None:
        """Close the scope for every process and wake every process's watcher."""
        self.check_usable()
        self.acquire()
        try:
            self.words[L.SCOPE_CLOSED] = 1
            table = self.table
            for word in range(0, L.SCOPE_SLOTS * L.SCOPE_ENTRY_WORDS, L.SCOPE_ENTRY_WORDS):
                table[word + 3] = 0
            self.words[L.SCOPE_COUNT] = 0
            # Post before clearing, under the lock: if we die half-way, the wakers not yet
            # posted are still listed, and recovery posts them.
            L.waitlist_post_all(self.words, L.SCOPE_WAITLIST_WORD, L.SCOPE_WAITING, self.namespace)
        finally:
            self.release_lock()

    # --- the watcher ----------------------------------------------------------------------------

    def _ensure_waker(self) -> None:
        if self.waker is None:
            self.waker = _waker.Waker(self.namespace)

    def _ensure_watcher(self) -> None:
        if self.watcher is not None and self.watcher.is_alive():
            return
        self._ensure_waker()
        self.stopping = False
        self.watcher = threading.Thread(target=self._watch, name=f"shmfeed-scope-{self.name}", daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        waker = self.waker
        assert waker is not None
        while not self.stopping:
            self.acquire()
            try:
                closed = self.words[L.SCOPE_CLOSED]
                if not closed:
                    L.waitlist_remove(self.words, L.SCOPE_WAITLIST_WORD, L.SCOPE_WAITING, waker.waker_id)
                    L.waitlist_add(self.words, L.SCOPE_WAITLIST_WORD, L.SCOPE_WAITING, waker.waker_id)
            finally:
                self.release_lock()
            if closed:
                for member in list(self.members):
                    member._end_local()
                return
            waker.wait(None)

    def stop_watcher(self) -> None:
        watcher, waker = self.watcher, self.waker
        if watcher is None or waker is None:
            return
        self.stopping = True
        waker.post()
        # The watcher may hold the last reference, so that the release runs in it (its run
        # ends there): it is stopping already, and a thread cannot join itself.
        if watcher is not threading.current_thread():
            watcher.join()
        self.watcher = None

    # --- lifetime ---------------------------------------------------------------------------------

    def _before_detach(self) -> None:
        self.stop_watcher()
        if self.waker is not None:
            self.acquire()
            try:
                L.waitlist_remove(self.words, L.SCOPE_WAITLIST_WORD, L.SCOPE_WAITING, self.waker.waker_id)
            finally:
                self.release_lock()

    def _after_detach(self) -> None:
        if self.waker is not None:
            self.waker.destroy()

    def _views(self) -> list[memoryview]:
        return [self.words, self.table, self.buffer]

    def lock_semaphores(self) -> list[Any]:
        return [self.lock]


_shared: "weakref.WeakValueDictionary[tuple[str, str], _SharedScope]" = weakref.WeakValueDictionary()
_local_scopes: "weakref.WeakSet[SubscriptionScope]" = weakref.WeakSet()


def release_namespace(namespace: str | None = None) -> None:
    """Detach this process from its named scopes (of one namespace, or all)."""
    for scope in list(_shared.values()):
        if namespace is None or scope.namespace == namespace:
            scope.release()


def _after_fork() -> None:
    # The parent's watcher threads do not exist here; the child's tracked subscriptions
    # will start their own. The parent's entries (and subscriptions) stay the parent's.
    _local_scopes.clear()
    for scope in list(_shared.values()):
        scope.watcher = None
        scope.waker = None
        scope.reattach_after_fork()
        for member in list(scope.members):
            member._lock = threading.Lock()
            member._tracked = {}


def _before_fork() -> None:
    for local in list(_local_scopes):
        local._share()
        _local_scopes.discard(local)
    for scope in list(_shared.values()):
        scope.reserve_for_child()


def _after_fork_in_parent() -> None:
    for scope in list(_shared.values()):
        if any(member._tracked for member in scope.members):
            scope._ensure_watcher()


_process.on_exit(release_namespace)
_process.before_fork(_before_fork)
_process.after_fork_in_parent(_after_fork_in_parent)
_process.on_fork_child(_after_fork)
