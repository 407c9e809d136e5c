"""Large values as files in /dev/shm, linked into each receiving channel.

A value too large for a channel's ring is written once per send into a file, and the file
is hard-linked once per receiving channel; each receiver unlinks its link after reading,
so the kernel frees the data when the last one has read it.

Allocating fresh tmpfs pages costs far more than copying into pages that exist (about
400 µs against 30 µs for 1 MiB here), so each sending process keeps a small pool of its
own spill files: a file whose link count is back to 1 (every receiver has read and
unlinked its link) is rewritten in place for the next large value. A file still linked
somewhere is never touched. Pool files carry the sender's pid, so ``shmfeed gc`` removes
those of dead processes.
"""

from __future__ import annotations

import os
import threading

from . import _names, _process

POOL_FILES = 8  # per process and namespace


class _PoolFile:
    __slots__ = ("path", "descriptor", "size", "busy")

    def __init__(self, path: str, descriptor: int) -> None:
        self.path = path
        self.descriptor = descriptor
        self.size = 0
        self.busy = False  # taken by a send that has not finished linking


_pools: dict[str, list[_PoolFile]] = {}
_pool_lock = threading.Lock()


def _take(namespace: str) -> _PoolFile:
    """A pool file no receiver still reads, or a new one (unpooled if the pool is full)."""
    with _pool_lock:
        pool = _pools.setdefault(namespace, [])
        for entry in pool:
            if not entry.busy and os.fstat(entry.descriptor).st_nlink == 1:
                entry.busy = True
                return entry
        path = _names.spill_temp_file(namespace, _names.new_id())
        entry = _PoolFile(path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        entry.busy = True
        if len(pool) < POOL_FILES:
            pool.append(entry)
        return entry


def _give_back(namespace: str, entry: _PoolFile) -> None:
    with _pool_lock:
        entry.busy = False
        if entry not in _pools.get(namespace, []):
            os.close(entry.descriptor)
            _unlink(entry.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Spill:
    """One large value of one send, written once, linked into each channel that needs it."""

    def __init__(self, namespace: str, payload: bytes) -> None:
        self.namespace = namespace
        self.payload = payload
        self.file: _PoolFile | None = None

    def link_into(self, namespace: str, channel_id: int) -> tuple[int, int]:
        """Link the value for one channel; returns ``(spill_id, size)`` for its record."""
        if self.file is None:
            self.file = _take(self.namespace)
            self._write(self.file)
        spill_id = _names.new_id()
        os.link(self.file.path, _names.spill_file(namespace, channel_id, spill_id))
        return spill_id, len(self.payload)

    def _write(self, file: _PoolFile) -> None:
        size = len(self.payload)
        if file.size != size:
            os.ftruncate(file.descriptor, size)
            file.size = size
        view, offset = memoryview(self.payload), 0
        while offset < size:
            offset += os.pwrite(file.descriptor, view[offset:], offset)

    def close(self) -> None:
        if self.file is not None:
            _give_back(self.namespace, self.file)
            self.file = None


def read_and_unlink(path: str, size: int) -> bytes:
    """A receiver's read of its link, which it then removes.

    Raises OSError if the file is missing, ValueError if it does not hold ``size`` bytes
    (a size read from shared memory is never trusted with an allocation).
    """
    try:
        with open(path, "rb", buffering=0) as spill:
            actual = os.fstat(spill.fileno()).st_size
            if actual != size:
                raise ValueError(f"the record says {size} bytes, the file holds {actual}")
            return spill.read(size)
    finally:
        _unlink(path)


def release_pools(namespace: str | None = None) -> None:
    """Close and unlink this process's pool files (links held by channels stay valid)."""
    with _pool_lock:
        for key in [k for k in _pools if namespace is None or k == namespace]:
            for entry in _pools.pop(key):
                os.close(entry.descriptor)
                _unlink(entry.path)


def _forget_after_fork() -> None:
    # The parent's pool files are the parent's: the child makes its own (named by its pid).
    global _pool_lock
    _pool_lock = threading.Lock()
    for pool in _pools.values():
        for entry in pool:
            os.close(entry.descriptor)
    _pools.clear()


_process.on_exit(release_pools)
_process.on_fork_child(_forget_after_fork)
