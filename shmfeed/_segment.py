"""What every shared-memory object of a process has in common: locking its header,
joining and leaving its attach slots, fork, and letting go of the mapping.

``ChannelCore``, ``FeedCore`` and the named scope's ``_SharedScope`` derive from
``AttachedSegment`` and add their own data, locks and names.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Any

from . import _layout as L
from . import _names, _process, _shm
from ._errors import ShmfeedError, TableFullError


def open_named(
    namespace: str, segment_name: str, kind: L.SegmentKind, damaged: type[ShmfeedError] = ShmfeedError
) -> tuple[mmap.mmap, list[Any]] | None:
    """Map an existing segment and open the semaphores its header names (in ``kind``'s order):
    the one way every process opens a segment (``_shm.open_segment``, then the header
    checked by ``_layout.header_problem`` before any word of it is used).

    Returns None if it does not exist or is being destroyed (a lock is gone).

    Raises:
        ShmfeedError: (``damaged``) its header is not a valid ``kind`` header (run ``shmfeed gc``).
        _shm.ForeignObjectError: the segment or one of its locks is not ours.
    """
    mapping = _shm.open_segment(segment_name)
    if mapping is None:
        return None
    try:
        words = memoryview(mapping)[: L.HEADER_BYTES].cast("Q")
        try:
            problem = L.header_problem(words, len(mapping), kind)
            if problem is not None:
                raise damaged(f"shmfeed: {kind.name} segment {segment_name!r} is damaged ({problem}); run `shmfeed gc`")
            locks = _open_locks(namespace, L.lock_ids(words, kind))
        finally:
            words.release()
    except BaseException:
        mapping.close()
        raise
    if locks is None:
        mapping.close()
        return None
    return mapping, locks


def _open_locks(namespace: str, lock_ids: list[int]) -> list[Any] | None:
    """Open lock semaphores by id; None if one is gone. Nothing stays open if it fails."""
    locks: list[Any] = []
    try:
        for lock_id in lock_ids:
            lock = _shm.open_semaphore(_names.lock_semaphore(namespace, lock_id))
            if lock is None:
                break
            locks.append(lock)
        else:
            return locks
    except BaseException:
        _close_all(locks)
        raise
    _close_all(locks)
    return None


def _close_all(semaphores: list[Any]) -> None:
    for semaphore in semaphores:
        semaphore.close()

# How long a finalizer's release waits for the segment lock. A holder that died is released
# by the registry within a scan or two; past this, the lock is held by something that will
# not let go (this very thread, say, if a collection ran the finalizer while it held it).
FINALIZER_LOCK_SECONDS = 5.0


class AttachedSegment:
    """This process's mapping of one segment, and its place in the segment's attach slots.

    Subclasses set ``kind`` and ``segment_lock`` (the semaphore guarding the header and
    attach slots) and implement ``lock_semaphores``.
    """

    kind: L.SegmentKind
    segment_lock: Any

    def _setup_segment(self, namespace: str, segment_name: str, mapping: mmap.mmap) -> None:
        self.namespace = namespace
        self.segment_name = segment_name
        self.mapping = mapping
        self.buffer = memoryview(mapping)
        self.words = self.buffer[: L.HEADER_BYTES].cast("Q")
        self.released = False
        self.attached = True
        self.refused: str | None = None
        self._release_lock = threading.Lock()

    # --- the header lock ----------------------------------------------------------------

    def acquire(self, deadline: float | None = None) -> None:
        """Take the segment lock, recording our pid so a death while holding it is repaired.

        Raises:
            TimeoutError: another process or thread still held it at ``deadline`` (a
                ``time.monotonic()`` value; None waits as long as it takes).
        """
        if not self.segment_lock.acquire_by(deadline):
            raise _shm.lock_timeout(self._lock_name(), int(self.words[L.LOCK_OWNER]))
        self.words[L.LOCK_OWNER] = os.getpid()

    def _lock_name(self) -> str:
        """The segment lock as an error message names it."""
        return f"the lock of {self.segment_name!r}"

    def release_lock(self) -> None:
        self.words[L.LOCK_OWNER] = 0
        self.segment_lock.release()

    # --- attach slots -----------------------------------------------------------------------

    def describe(self) -> str:
        """What this object is, for messages."""
        return f"shared object {self.segment_name!r}"

    def join(self, deadline: float | None = None) -> bool:
        """Enter the attach slots; False if the segment is being destroyed.

        Raises:
            TableFullError: every attach slot is taken by a live process (the mapping is
                let go of first).
        """
        self.acquire(deadline)
        try:
            if self.words[L.DESTROYED]:
                return False
            full = not L.attach(self.words)
        finally:
            self.release_lock()
        if full:
            self._close_local()
            raise TableFullError(L.table_full_message(self.describe()))
        self.attached = True
        return True

    def reattach_after_fork(self) -> None:
        """In a forked child: take the slot the parent reserved (see ``reserve_for_child``).

        If every slot is taken, the child cannot use the object: ``refused`` says why, and
        its first use raises ``TableFullError`` (nothing can be raised from a fork hook).
        """
        self._release_lock = threading.Lock()
        self.acquire()
        try:
            if not self.words[L.DESTROYED] and not L.claim_after_fork(self.words):
                self.refused = L.table_full_message(self.describe())
                self.attached = False
        finally:
            self.release_lock()

    def check_usable(self) -> None:
        """Raise ``TableFullError`` if this process could not attach after fork."""
        if self.refused is not None:
            raise TableFullError(self.refused)

    def reserve_for_child(self) -> None:
        """Before fork: hold a slot for the child, which may run after we let go."""
        if self.released or not self.attached:
            return
        self.acquire()
        try:
            if not self.words[L.DESTROYED]:
                L.reserve_for_child(self.words)
        finally:
            self.release_lock()

    def release(self, lock_timeout: float | None = None) -> None:
        """Leave the segment; the last live process unlinks its names. Idempotent.

        A call while another thread releases the segment returns once that release is done:
        the other may be a finalizer (``__del__`` in whichever thread dropped the last
        reference, a scope's watcher say) that ``release_namespace`` found through a weak
        reference mid-way, and its callers count on the segment being let go on return.

        ``lock_timeout`` bounds the wait for the segment lock (a finalizer's release must
        not wait for good): past it, this process's attach slot is left as it is, for the
        registry to clear once the process is gone. After the exit hooks ran, nothing is
        done in shared memory at all (see ``_process.exit_done``).
        """
        with self._release_lock:
            if self.released:
                return
            self.released = True
            if _process.exit_done():
                return  # the exit hooks let go of everything; the registry does the rest
            self._detach_and_close(None if lock_timeout is None else time.monotonic() + lock_timeout)

    def _detach_and_close(self, deadline: float | None) -> None:
        last = False
        if self.attached:
            self._before_detach()
            # Asked before the lock: it may look at other segments, and nothing that can
            # run a finalizer (one may want this very lock) belongs under it.
            kept = self._outlives_holders()
            try:
                self.acquire(deadline)
            except TimeoutError:
                pass  # our slot stays for the registry to clear once we are gone
            else:
                try:
                    last = L.detach(self.words) and not self.words[L.DESTROYED] and not kept
                    if last:
                        self.words[L.DESTROYED] = 1  # under the lock: openers now see it is gone
                finally:
                    self.release_lock()
        if last:
            self.unlink_names()
        self._after_detach()
        if not _process.exiting():  # at exit a daemon thread may still use the mapping
            self._close_local()

    def _before_detach(self) -> None:
        """Hook: drop per-process state that refers to the segment."""

    def _outlives_holders(self) -> bool:
        """Hook (before the detach, lock not held): stay in /dev/shm though the last
        process leaves (a durable bridge's outbox, see ``_outbox``)."""
        return False

    def _after_detach(self) -> None:
        """Hook: release what must outlive the detach step."""

    def unlink_names(self) -> None:
        """Remove the segment's names from /dev/shm (it is marked DESTROYED): its locks, then
        the files that belong to it, then the segment.

        Segment last: a process killed half-way leaves a segment that names what is left.
        """
        for lock_id in L.lock_ids(self.words, self.kind):
            _shm.unlink_semaphore(_names.lock_semaphore(self.namespace, lock_id))
        self._unlink_files()
        _shm.unlink_segment(self.segment_name)

    def _unlink_files(self) -> None:
        """Hook: remove files of the segment's other than its locks (before the segment)."""

    # --- the mapping ---------------------------------------------------------------------------

    def _views(self) -> list[memoryview]:
        """Views of the mapping to release before closing it, innermost first."""
        return [self.words, self.buffer]

    def lock_semaphores(self) -> list[Any]:
        """This process's handles of the segment's locks, in the order of ``kind.locks``."""
        raise NotImplementedError

    def _close_local(self) -> None:
        try:
            for view in self._views():
                view.release()
            self.mapping.close()
        except (BufferError, ValueError):
            pass  # a view is still exported somewhere: the mapping goes with the process
        for semaphore in self.lock_semaphores():
            try:
                semaphore.close()
            except Exception:  # noqa: BLE001 - already closed
                pass

    def __del__(self) -> None:
        if not getattr(self, "released", True):
            try:
                self.release(FINALIZER_LOCK_SECONDS)
            except Exception:  # noqa: BLE001 - nothing to report to during collection
                pass
