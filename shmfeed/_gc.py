"""Finding and removing what processes of a namespace left in /dev/shm.

A segment is garbage when none of the processes in its attach slots is alive; a waker or
spill temp file when the pid in its name is dead; a lock semaphore when no segment names
it (and it is older than a grace period, since a segment being created makes its locks
first); a spill link when its channel is gone.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field

from . import _layout as L
from . import _names, _process, _shm

LOCK_GRACE_SECONDS = 30.0


@dataclass
class Leftovers:
    """What a sweep found (or removed): paths in /dev/shm by kind."""

    segments: list[str] = field(default_factory=list)
    semaphores: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return self.segments + self.semaphores + self.files


def namespace_entries(namespace: str) -> list[str]:
    """Names in /dev/shm that belong to ``namespace``."""
    start = _names.prefix(namespace)
    try:
        entries = os.listdir(_names.SHM_DIR)
    except OSError:
        return []
    return sorted(e for e in entries if e.startswith(start) or e.startswith("sem." + start))


def _segment_state(path: str) -> tuple[bool, list[int]]:
    """(any live process attached, lock ids it names)."""
    try:
        with open(path, "rb") as segment_file:
            size = os.fstat(segment_file.fileno()).st_size
            if size < L.HEADER_BYTES:
                return False, []
            mapping = mmap.mmap(segment_file.fileno(), L.HEADER_BYTES, prot=mmap.PROT_READ)
    except OSError:
        return True, []  # cannot tell: leave it
    try:
        words = memoryview(mapping).cast("Q")
        try:
            locks = [int(words[L.LOCK_ID])]
            if words[L.MAGIC] == L.FEED_MAGIC:
                locks.append(int(words[L.SEND_LOCK_ID]))
            elif words[L.MAGIC] == L.CHANNEL_MAGIC:
                locks += [int(words[L.RECV_LOCK_ID]), int(words[L.WAIT_LOCK_ID])]
            alive = any(_process.is_alive(pid, ticks) for pid, ticks in L.attached_processes(words))
            if words[L.MAGIC] not in L.MAGICS:
                alive = False
            return alive and not words[L.DESTROYED], locks
        finally:
            words.release()
    finally:
        mapping.close()


def sweep(namespace: str, remove: bool = True) -> Leftovers:
    """Find (and with ``remove``, unlink) the namespace's leftovers of dead processes."""
    start = _names.prefix(namespace)
    found = Leftovers()
    entries = namespace_entries(namespace)
    live_locks: set[int] = set()
    live_channels: set[str] = set()
    for entry in entries:
        if entry.startswith(start) and "." not in entry[len(start) :]:
            path = f"{_names.SHM_DIR}/{entry}"
            alive, locks = _segment_state(path)
            if alive:
                live_locks.update(locks)
                live_channels.add(entry)
            else:
                found.segments.append(path)
                if remove:
                    _shm.unlink_segment("/" + entry)
                for lock_id in locks:  # the dead segment's locks go with it
                    lock_path = _names.semaphore_path(_names.lock_semaphore(namespace, lock_id))
                    if os.path.exists(lock_path):
                        found.semaphores.append(lock_path)
                        if remove:
                            _shm.unlink_semaphore(_names.lock_semaphore(namespace, lock_id))
    now = time.time()
    for entry in entries:
        path = f"{_names.SHM_DIR}/{entry}"
        rest = entry[len("sem." + start) :] if entry.startswith("sem.") else entry[len(start) :]
        garbage = False
        if path in found.semaphores:
            continue
        if entry.startswith("sem.") and rest.startswith("w"):
            garbage = not _pid_alive(int(rest[1:], 16) >> 32)
        elif entry.startswith("sem.") and rest.startswith("l"):
            garbage = int(rest[1:], 16) not in live_locks and _older_than(path, now, LOCK_GRACE_SECONDS)
        elif rest.startswith("t"):
            garbage = not _pid_alive(int(rest[1:].split(".")[0], 16))
        elif rest.startswith("c") and ".x" in rest:
            garbage = start + rest.split(".")[0] not in live_channels
        elif ".t" in rest and not entry.startswith("sem."):
            garbage = _older_than(path, now, LOCK_GRACE_SECONDS)  # a creation that died
        else:
            continue
        if garbage:
            (found.semaphores if entry.startswith("sem.") else found.files).append(path)
            if remove:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
    return found


def _pid_alive(pid: int) -> bool:
    return _process.start_ticks(pid) is not None


def _older_than(path: str, now: float, seconds: float) -> bool:
    try:
        return now - os.stat(path).st_mtime > seconds
    except OSError:
        return False
