"""The Python-level floor for tools/bench.py: a featureless single-producer/single-consumer ring.

One posix_ipc SharedMemory segment of ``slots`` fixed-size slots (4-byte length + payload) and
two posix_ipc counting semaphores (``free`` starts at ``slots``, ``used`` at 0): the classic
bounded buffer. The producer blocks when the ring is full, the consumer when it is empty;
glibc's sem_post/sem_wait only enter the kernel when the other side sleeps (or must sleep).
No fan-out, no select, no crash recovery, no stats: just what shmfeed's building blocks give.

Create it in the parent before forking; ``unlink()`` in the parent at the end.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct

import posix_ipc

_LEN = struct.Struct("<I")
_END = 0  # a zero-length record ends the stream (msgpack output is never empty)
_counter = itertools.count()


class PlainRing:
    def __init__(self, slots: int, max_record: int) -> None:
        self.slots = slots
        self.slot_size = (max_record + _LEN.size + 63) & ~63
        base = f"/plainring-{os.getpid()}-{next(_counter)}"
        self.names = (base, base + "-free", base + "-used")
        flags = posix_ipc.O_CREX
        shm = posix_ipc.SharedMemory(base, flags, mode=0o600, size=slots * self.slot_size)
        try:
            self.mm = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        self.free = posix_ipc.Semaphore(self.names[1], flags, mode=0o600, initial_value=slots)
        self.used = posix_ipc.Semaphore(self.names[2], flags, mode=0o600, initial_value=0)
        self.view = memoryview(self.mm)
        self.pos = 0  # producer's or consumer's next slot (each side keeps its own copy after fork)

    # -- producer ----------------------------------------------------------------------
    def put(self, data: bytes) -> None:
        n = len(data)
        if n + _LEN.size > self.slot_size:
            raise ValueError(f"record of {n} bytes does not fit a {self.slot_size}-byte slot")
        self.free.acquire()
        off = self.pos * self.slot_size
        _LEN.pack_into(self.mm, off, n)
        self.view[off + 4 : off + 4 + n] = data
        self.pos = (self.pos + 1) % self.slots
        self.used.release()

    def put_end(self) -> None:
        self.free.acquire()
        _LEN.pack_into(self.mm, self.pos * self.slot_size, _END)
        self.pos = (self.pos + 1) % self.slots
        self.used.release()

    # -- consumer ----------------------------------------------------------------------
    def get(self, decode=bytes):
        """Next record passed through ``decode`` (it reads the slot in place), None at the end."""
        self.used.acquire()
        off = self.pos * self.slot_size
        (n,) = _LEN.unpack_from(self.mm, off)
        value = None if n == _END else decode(self.view[off + 4 : off + 4 + n])
        self.pos = (self.pos + 1) % self.slots
        self.free.release()
        return value

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Drop this process's mapping and semaphore handles."""
        if self.mm is None:
            return
        self.view.release()
        self.mm.close()
        self.mm = None
        self.free.close()
        self.used.close()

    def unlink(self) -> None:
        """Remove the names (the creator does this once, at the end)."""
        for unlink, name in zip(
            (posix_ipc.unlink_shared_memory, posix_ipc.unlink_semaphore, posix_ipc.unlink_semaphore), self.names
        ):
            try:
                unlink(name)
            except posix_ipc.ExistentialError:
                pass
