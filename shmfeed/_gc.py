"""Finding and removing what processes of a namespace left in /dev/shm.

A segment is garbage when none of the processes in its attach slots is alive; a waker or
spill temp file when the pid in its name is dead; a spill link when its channel is gone; a
lock semaphore when no segment names it and it is older than ``LOCK_GRACE_SECONDS``.

The grace period is decided from the lock's age: the mtime of its file in /dev/shm, set
when ``sem_open`` made it (glibc writes the file, then links it in) and moved by nothing
after (waits and posts go through a mapping). A segment is made lock semaphores first, then
the segment published by ``link(2)``, so a lock that no segment names is normal for the
moment a creation takes; one still unnamed after the grace period was left by a creation
that died (a process killed between the two steps), or by a segment that no longer names
it (destroyed half-way, overwritten). A creation slower than that is taken for a dead one:
its temporary segment name goes after the same grace period.

Only names that ``_names.parse_entry`` recognises, on files that pass ``_shm.check_own``
(regular, ours, no group/other bits), are looked at (``own_entries``), and segments are
mapped only through ``_shm.map_own``; anything else is left alone as not ours and never
raises. One exception names no namespace: glibc's temporary file of a ``sem_open`` that
was killed half-way (``_semaphore_temps``), ours and older than the grace period. One
kind of leftover is not in /dev/shm: the status file of a bridge killed before it could
remove it, in the runtime directory (``_bridge_status.stale``).
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field

from . import _layout as L
from . import _bridge_status, _names, _outbox, _process, _shm
from ._names import Entry, EntryKind

LOCK_GRACE_SECONDS = 5.0


@dataclass
class Leftovers:
    """What a sweep found (or removed): paths in /dev/shm by kind (``files`` also holds
    dead bridges' status files)."""

    segments: list[str] = field(default_factory=list)
    semaphores: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return self.segments + self.semaphores + self.files


def namespace_entries(namespace: str) -> list[str]:
    """Names in /dev/shm that belong to ``namespace`` (whatever they are)."""
    start = _names.prefix(namespace)
    try:
        entries = os.listdir(_names.SHM_DIR)
    except OSError:
        return []
    return sorted(e for e in entries if e.startswith(start) or e.startswith("sem." + start))


def own_entries(namespace: str) -> list[Entry]:
    """The namespace's names that the library makes, on files of ours (``_shm.is_own``).

    Anything else (a name planted or damaged, another user's file, one open to others) is
    nothing gc, recovery, the registry or the monitor may act on: they skip it, and it keeps
    no registry alive.
    """
    found = []
    for file in namespace_entries(namespace):
        entry = _names.parse_entry(namespace, file)
        if entry is not None and _shm.is_own(entry.path):
            found.append(entry)
    return found


def map_segment(path: str, whole: bool = False) -> tuple[mmap.mmap, int] | None:
    """Map a segment read-only through ``_shm.map_own``, its header or the ``whole`` of it:
    (mapping, file size); None if the file is smaller than a header.

    Raises:
        OSError: it cannot be opened now (gone, not ours: ``_shm.ForeignObjectError``, no
            descriptors left).
    """
    return _shm.map_own(path, length=0 if whole else L.HEADER_BYTES, min_size=L.HEADER_BYTES)


def _segment_state(path: str, outboxes: "_Outboxes") -> tuple[bool, list[int]] | None:
    """(any live process attached, ids of the locks it names); None if it cannot be read now.

    A segment of no known kind (damaged, overwritten) is dead and names no lock: its words
    are not to be trusted, and the locks it had go as orphaned ones after the grace period.
    A durable bridge's outbox that a live feed names counts as live (``_outbox``).
    """
    try:
        mapped = map_segment(path)
    except (OSError, ValueError):
        return None
    if mapped is None:
        return False, []
    mapping, size = mapped
    try:
        words = memoryview(mapping).cast("Q")
        try:
            kind = L.segment_kind(words, size)
            if kind is None:
                return False, []
            alive = not words[L.DESTROYED] and any(
                L.slot_alive(pid, ticks) for pid, ticks in L.attached_processes(words)
            )
            if not alive and not words[L.DESTROYED] and kind is L.CHANNEL_KIND \
                    and words[L.CHANNEL_FLAGS] & L.FLAG_OUTBOX:
                alive = outboxes.names(path)
            return alive, L.lock_ids(words, kind)
        finally:
            words.release()
    finally:
        mapping.close()


def sweep(namespace: str, remove: bool = True) -> Leftovers:
    """Find (and with ``remove``, unlink) the namespace's leftovers of dead processes."""
    found = Leftovers()
    entries = own_entries(namespace)
    named_locks: set[int] | None = set()  # None: a segment could not be read, so any lock may be named
    live_segments: set[str] = set()
    outboxes = _Outboxes(namespace)
    for entry in entries:
        if entry.kind not in _names.SEGMENT_ENTRY_KINDS:
            continue
        state = _segment_state(entry.path, outboxes)
        if state is None or state[0]:
            live_segments.add(entry.segment)
            if state is None:
                named_locks = None
            elif named_locks is not None:
                named_locks.update(state[1])
        else:
            _remove_dead_segment(namespace, entry, state[1], found, remove)
    now = time.time()
    for entry in entries:
        if entry.path in found.semaphores or not _is_leftover(entry, named_locks, live_segments, now):
            continue
        if not remove or _unlink(entry.path):
            (found.semaphores if entry.kind in (EntryKind.LOCK, EntryKind.WAKER) else found.files).append(entry.path)
    for path in _semaphore_temps(now):
        if not remove or _unlink(path):
            found.semaphores.append(path)
    found.files += _bridge_status.stale(namespace, remove=remove)
    return found


class _Outboxes:
    """The outboxes the namespace's live feeds name, looked up once per sweep, and only if
    an orphaned outbox is found."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.named: set[str] | None = None

    def names(self, path: str) -> bool:
        if self.named is None:
            self.named = {_names.shm_path(_names.channel_segment(self.namespace, channel_id))
                          for channel_id in _outbox.named_channels(self.namespace)}
        return path in self.named


def _semaphore_temps(now: float) -> list[str]:
    """glibc's temporary files of ``sem_open`` (``sem.XXXXXX``) of this user that a process
    killed inside the call left: it makes the file, then links it under the semaphore's
    name and removes it, microseconds apart. They name no namespace, so every sweep
    looks; one older than the grace period can be no live call's."""
    try:
        files = os.listdir(_names.SHM_DIR)
    except OSError:
        return []
    paths = [f"{_names.SHM_DIR}/{file}" for file in files if _names.is_semaphore_temp(file)]
    return [path for path in paths if _shm.is_own(path) and _older_than(path, now, LOCK_GRACE_SECONDS)]


def _remove_dead_segment(namespace: str, entry: Entry, lock_ids: list[int], found: Leftovers, remove: bool) -> None:
    """A segment no live process uses, and the locks it names (locks first, as everywhere)."""
    for lock_id in lock_ids:
        lock_name = _names.lock_semaphore(namespace, lock_id)
        lock_path = _names.semaphore_path(lock_name)
        if _shm.is_own(lock_path):  # another user's file at the name is not ours to remove
            found.semaphores.append(lock_path)
            if remove:
                _shm.unlink_semaphore(lock_name)
    found.segments.append(entry.path)
    if remove:
        _shm.unlink_segment(entry.segment)


# Names that carry their process's pid: a leftover once that process is dead.
PER_PROCESS_KINDS = (EntryKind.WAKER, EntryKind.SPILL_TEMP, EntryKind.SPILL_PIN)


def _is_leftover(entry: Entry, named_locks: set[int] | None, live_segments: set[str], now: float) -> bool:
    """Whether a name that is not a segment was left by a dead process (segments are judged
    by their attach slots, in ``sweep``)."""
    if entry.kind in PER_PROCESS_KINDS:
        return not _pid_alive(entry.pid)
    if entry.kind is EntryKind.LOCK:
        return (named_locks is not None and entry.number not in named_locks
                and _older_than(entry.path, now, LOCK_GRACE_SECONDS))
    if entry.kind is EntryKind.SPILL_LINK:
        return entry.segment not in live_segments
    if entry.kind is EntryKind.CREATING:
        return _older_than(entry.path, now, LOCK_GRACE_SECONDS)  # a creation that died
    return False


_unlink = _shm.remove_file


def _pid_alive(pid: int) -> bool:
    return _process.start_ticks(pid) is not None


def _older_than(path: str, now: float, seconds: float) -> bool:
    try:
        return now - os.stat(path).st_mtime > seconds
    except OSError:
        return False
