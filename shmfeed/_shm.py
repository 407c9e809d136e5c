"""Shared memory segments and named semaphores: create, publish, open, unlink, lock.

Segments are created under a temporary name, initialised, then published with ``link(2)``
so that nobody can ever open a half-initialised segment, and exactly one of several
processes racing to create the same name wins. Everything is created mode 0600.
Low-level ``posix_ipc`` errors never reach users: they are wrapped with the object's name.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from typing import Callable

import posix_ipc

from . import _names
from ._errors import ShmfeedError

MODE = 0o600


class SharedObjectError(ShmfeedError, OSError):
    """A shared memory segment or semaphore could not be created or opened."""


def create_segment(name: str, size: int, initialise: Callable[[mmap.mmap], None]) -> mmap.mmap | None:
    """Create, initialise and publish the segment ``name``; None if another process won.

    ``initialise`` fills the new mapping before anyone else can open it.
    """
    temp_name = f"{name}.t{os.getpid():x}{_names.new_id():x}"[:250]
    try:
        segment = posix_ipc.SharedMemory(temp_name, posix_ipc.O_CREX, MODE, size)
    except posix_ipc.Error as error:
        raise SharedObjectError(
            f"shmfeed: cannot create shared memory {name!r} of {size} bytes: {error} "
            f"(is /dev/shm full or too small?)"
        ) from error
    try:
        try:
            mapping = mmap.mmap(segment.fd, size)
        finally:
            segment.close_fd()
        initialise(mapping)
        try:
            os.link(_names.shm_path(temp_name), _names.shm_path(name))
        except FileExistsError:
            mapping.close()
            return None
        return mapping
    finally:
        _unlink_quietly(temp_name)


def open_segment(name: str) -> mmap.mmap | None:
    """Map an existing segment; None if it does not exist."""
    try:
        segment = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return None
    except posix_ipc.Error as error:
        raise SharedObjectError(f"shmfeed: cannot open shared memory {name!r}: {error}") from error
    try:
        if segment.size == 0:
            return None
        return mmap.mmap(segment.fd, segment.size)
    finally:
        segment.close_fd()


def _unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.Error:
        pass


def unlink_segment(name: str) -> None:
    """Remove a segment's name (mappings stay valid); missing is fine."""
    _unlink_quietly(name)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


# Sleeping goes through libc directly: posix_ipc replaces any exception a signal handler
# raises during a wait (other than KeyboardInterrupt) with its own SignalError, which
# would hide e.g. a timeout alarm. With ctypes, EINTR comes back to Python, where the
# handler runs and its exception propagates, or the wait resumes (PEP 475 semantics).
libc = ctypes.CDLL(None, use_errno=True)
libc.sem_open.restype = ctypes.c_void_p
libc.sem_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.sem_close.argtypes = [ctypes.c_void_p]
libc.sem_wait.argtypes = [ctypes.c_void_p]
libc.sem_trywait.argtypes = [ctypes.c_void_p]
libc.sem_timedwait.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]


def native_wait(handle: int, timeout: float | None) -> bool:
    """Decrement the semaphore at ``handle``; False after ``timeout`` seconds."""
    if timeout is None:
        while libc.sem_wait(handle) != 0:
            if ctypes.get_errno() != errno.EINTR:
                raise OSError(ctypes.get_errno(), "sem_wait failed")
        return True
    deadline = time.time() + max(0.0, timeout)  # sem_timedwait measures CLOCK_REALTIME
    whole = int(deadline)
    spec = _Timespec(whole, int((deadline - whole) * 1e9))
    while libc.sem_timedwait(handle, ctypes.byref(spec)) != 0:
        error = ctypes.get_errno()
        if error == errno.ETIMEDOUT:
            return False
        if error != errno.EINTR:
            raise OSError(error, "sem_timedwait failed")
    return True


class Semaphore(posix_ipc.Semaphore):
    """A posix_ipc semaphore whose ``acquire`` waits like a Python call should.

    posix_ipc's own wait fails with ``SignalError`` whenever a signal handler ran (a
    release at exit left a segment half-destroyed this way) and replaces whatever the
    handler raised. So only the uncontended case is posix_ipc's (a ``sem_trywait``);
    waiting goes through ``native_wait``, which resumes after a handler ran and lets the
    handler's exception (KeyboardInterrupt, SystemExit, a timeout alarm) propagate.
    """

    __slots__ = ("_native",)

    def acquire(self, timeout: float | None = None) -> None:
        try:
            super().acquire(0)
            return
        except posix_ipc.BusyError:
            pass
        if not native_wait(self._native_handle(), timeout):
            raise posix_ipc.BusyError(f"semaphore {self.name!r} still taken after {timeout} s")

    def acquire_by(self, deadline: float | None) -> bool:
        """Take the semaphore by ``deadline`` (a ``time.monotonic()`` value; None: however
        long it takes); False if it was still taken then.

        The uncontended case costs what ``acquire`` costs: the clock is read only when the
        semaphore is taken.
        """
        try:
            super().acquire(0)
            return True
        except posix_ipc.BusyError:
            pass
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        return native_wait(self._native_handle(), timeout)

    def _native_handle(self) -> int:
        handle: int | None = getattr(self, "_native", None)
        if handle is None:
            handle = libc.sem_open(self.name.encode(), 0)
            if not handle:
                raise SharedObjectError(f"shmfeed: cannot open semaphore {self.name!r}")
            self._native = handle
        return handle

    def close(self) -> None:
        handle = getattr(self, "_native", None)
        if handle:
            self._native = None
            libc.sem_close(handle)  # glibc counts opens: posix_ipc's own handle stays valid
        super().close()


def create_semaphore(name: str, initial_value: int) -> posix_ipc.Semaphore:
    """Create a new named semaphore (the name must be fresh)."""
    try:
        return Semaphore(name, posix_ipc.O_CREX, MODE, initial_value)
    except posix_ipc.Error as error:
        raise SharedObjectError(f"shmfeed: cannot create semaphore {name!r}: {error}") from error


def open_semaphore(name: str) -> posix_ipc.Semaphore | None:
    """Open an existing named semaphore; None if it does not exist."""
    try:
        return Semaphore(name)
    except posix_ipc.ExistentialError:
        return None
    except posix_ipc.Error as error:
        raise SharedObjectError(f"shmfeed: cannot open semaphore {name!r}: {error}") from error


def unlink_semaphore(name: str) -> None:
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.Error:
        pass


class LockBusy(SharedObjectError):
    """A bounded lock could not be taken in time (recovery moves on and retries later)."""


class BoundedLock:
    """A semaphore whose ``acquire`` gives up after ``timeout`` seconds with ``LockBusy``.

    The registry takes locks through these so that a lock orphaned by a dead process can
    never stall the process whose job is to free it.
    """

    def __init__(self, semaphore: posix_ipc.Semaphore, timeout: float) -> None:
        self.semaphore = semaphore
        self.timeout = timeout

    def acquire(self, timeout: float | None = None) -> None:
        try:
            self.semaphore.acquire(self.timeout if timeout is None else min(timeout, self.timeout))
        except posix_ipc.BusyError:
            raise LockBusy(f"shmfeed: semaphore {self.semaphore.name!r} stayed taken") from None

    def acquire_by(self, deadline: float | None) -> bool:
        """As ``Semaphore.acquire_by``, but never past this lock's own bound (``LockBusy``)."""
        if deadline is None or deadline - time.monotonic() >= self.timeout:
            self.acquire()
            return True
        return bool(self.semaphore.acquire_by(deadline))

    def release(self) -> None:
        self.semaphore.release()

    @property
    def value(self) -> int:
        return int(self.semaphore.value)

    def close(self) -> None:
        self.semaphore.close()


def lock_timeout(lock: str, owner: int) -> TimeoutError:
    """The error of a wait for ``lock`` (e.g. "the send lock of channel 00ab...") that
    reached its deadline; ``owner`` is the pid in the lock's owner word (0: not written yet)."""
    if owner == os.getpid():
        holder = "another thread of this process"
    elif owner:
        holder = f"another process (pid {owner})"
    else:
        holder = "another process"
    return TimeoutError(f"shmfeed: timed out waiting for {lock}, held by {holder}")
