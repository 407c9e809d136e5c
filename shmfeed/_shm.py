"""Shared memory segments and named semaphores: create, publish, open, unlink, lock.

Segments are created under a temporary name, initialised, then published with ``link(2)``
so that nobody can ever open a half-initialised segment, and exactly one of several
processes racing to create the same name wins. Everything is created mode 0600, its
memory reserved at once (``reserve``): a store into a page that a full /dev/shm cannot
back is a SIGBUS, so a full /dev/shm must be an error where the space is asked for.
Low-level ``posix_ipc`` errors never reach users: they are wrapped with the object's name.

One door: every file of a namespace that the library opens (segments, spill files) goes
through ``open_own`` (no symlink followed, no FIFO waited on) and every existing named
semaphore through ``check_semaphore`` before ``sem_open``; both apply ``check_own``: a
regular file, owned by this user, with no group or other permission bits, as the library
makes them. Anything else was planted (or damaged) and is refused with
``ForeignObjectError``; gc, recovery, the registry and the monitor skip it as not ours.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import time
from typing import Callable

import posix_ipc

from . import _names
from ._errors import ShmfeedError

MODE = 0o600


class SharedObjectError(ShmfeedError, OSError):
    """A shared memory segment, semaphore or spill file could not be created or opened
    (``errno`` ENOSPC: /dev/shm is full)."""


class ForeignObjectError(SharedObjectError):
    """What sits at one of the namespace's names is not this user's own object (another
    user's, not a regular file, or open to others): it was planted or damaged, and is
    never used."""


_FILE_TYPES = {stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory",
               stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}


def _problem(info: os.stat_result) -> str | None:
    """Why a file is not one the library made (see ``check_own``); None if it may be."""
    if not stat.S_ISREG(info.st_mode):
        return f"not a regular file but {_FILE_TYPES.get(stat.S_IFMT(info.st_mode), 'something else')}"
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    if info.st_mode & 0o077:
        return f"mode {stat.S_IMODE(info.st_mode):04o} lets other users in"
    return None


def _not_ours(path: str, problem: str) -> ForeignObjectError:
    return ForeignObjectError(
        errno.EPERM,
        f"shmfeed: {path} is not yours ({problem}): another user planted it, or it was damaged, "
        f"so it is not used; remove it (as its owner or root) or use another SHMFEED_NAMESPACE",
    )


def check_own(info: os.stat_result, path: str) -> None:
    """Refuse a file (``info`` from ``fstat``/``lstat`` of ``path``) that is not what the
    library makes: a regular file, owned by this user, no group or other permission bits.

    Raises:
        ForeignObjectError: it is not.
    """
    problem = _problem(info)
    if problem is not None:
        raise _not_ours(path, problem)


def is_foreign(path: str) -> bool:
    """Whether something that fails ``check_own`` (planted by another user, say) is at
    ``path``; False if there is nothing."""
    try:
        return _problem(os.lstat(path)) is not None
    except OSError:
        return False


def is_own(path: str) -> bool:
    """Whether the file at ``path`` (a link not followed) passes ``check_own``; False if
    there is none."""
    try:
        return _problem(os.lstat(path)) is None
    except OSError:
        return False


def open_own(path: str, writable: bool = False) -> tuple[int, os.stat_result]:
    """The one door to a file of the namespace in /dev/shm: open it (no symlink followed,
    no FIFO waited on) and check it (``check_own``). Returns the descriptor, which the
    caller closes, and its ``fstat``.

    Raises:
        FileNotFoundError: there is nothing at ``path``.
        ForeignObjectError: what is there is not ours.
        OSError: it cannot be opened now (no descriptors left, ...).
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENXIO):  # ENXIO: a socket
            raise
        try:  # a symlink (O_NOFOLLOW), or another user's file we may not open: say which
            problem = _problem(os.lstat(path))
        except OSError:
            problem = None
        raise _not_ours(path, problem or str(error.strerror)) from error
    try:
        info = os.fstat(descriptor)
        check_own(info, path)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor, info


def map_own(path: str, writable: bool = False, length: int = 0, min_size: int = 1) -> tuple[mmap.mmap, int] | None:
    """Map a file through ``open_own``: its first ``length`` bytes, or all of it (0).
    Returns (mapping, file size), or None if the file is shorter than ``length`` or
    ``min_size`` bytes.

    Raises:
        as ``open_own``.
    """
    descriptor, info = open_own(path, writable)
    try:
        if info.st_size < max(length, min_size, 1):
            return None
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        return mmap.mmap(descriptor, length or info.st_size, access=access), info.st_size
    finally:
        os.close(descriptor)


def reserve(descriptor: int, size: int, what: str) -> None:
    """Make the file ``size`` bytes long with all its memory taken now (``posix_fallocate``),
    so that no store into its mapping can later find /dev/shm full: that is a SIGBUS.

    Raises:
        SharedObjectError: with errno ENOSPC if /dev/shm is full (the file keeps its size).
    """
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            message = (f"shmfeed: /dev/shm is full: {what} needs {size} bytes there; free some space "
                       f"(`shmfeed gc` removes what dead processes left) or make /dev/shm larger")
        else:
            message = f"shmfeed: cannot reserve {size} bytes in /dev/shm for {what}: {error.strerror}"
        raise SharedObjectError(error.errno, message) from error


def create_segment(name: str, size: int, initialise: Callable[[mmap.mmap], None]) -> mmap.mmap | None:
    """Create, initialise and publish the segment ``name``; None if another process won.

    ``initialise`` fills the new mapping before anyone else can open it.

    Raises:
        SharedObjectError: it cannot be created (errno ENOSPC: /dev/shm is full).
    """
    temp_name = f"{name}.t{os.getpid():x}{_names.new_id():x}"[:250]
    try:
        segment = posix_ipc.SharedMemory(temp_name, posix_ipc.O_CREX, MODE)  # empty: reserved below
    except posix_ipc.Error as error:
        raise SharedObjectError(
            f"shmfeed: cannot create shared memory {name!r} of {size} bytes: {error}; free space in /dev/shm "
            f"(shmfeed gc removes leftovers)"
        ) from error
    try:
        try:
            reserve(segment.fd, size, f"shared memory {name!r}")
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
    """Map an existing segment read-write (through ``map_own``); None if it does not exist.

    Raises:
        ForeignObjectError: what is at the name is not ours.
        SharedObjectError: it cannot be opened now.
    """
    try:
        mapped = map_own(_names.shm_path(name), writable=True)
    except FileNotFoundError:
        return None
    except SharedObjectError:
        raise
    except OSError as error:
        message = f"shmfeed: cannot open shared memory {name!r}: {error.strerror}"
        raise SharedObjectError(error.errno, message) from error
    return None if mapped is None else mapped[0]


def remove_file(path: str) -> bool:
    """Remove a file of ours; True once it is gone (or was), False if it could not be."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


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
                raise OSError(ctypes.get_errno(), "shmfeed: sem_wait failed; was the semaphore removed? (shmfeed gc)")
        return True
    deadline = time.time() + max(0.0, timeout)  # sem_timedwait measures CLOCK_REALTIME
    whole = int(deadline)
    spec = _Timespec(whole, int((deadline - whole) * 1e9))
    while libc.sem_timedwait(handle, ctypes.byref(spec)) != 0:
        error = ctypes.get_errno()
        if error == errno.ETIMEDOUT:
            return False
        if error != errno.EINTR:
            raise OSError(error, "shmfeed: sem_timedwait failed; was the semaphore removed? (shmfeed gc)")
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
    _native: int | None  # the libc handle for waits (``open_native``), opened on first need

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
            handle = open_native(self.name)
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
        raise SharedObjectError(
            f"shmfeed: cannot create semaphore {name!r}: {error}; free space in /dev/shm (shmfeed gc removes leftovers)"
        ) from error


def check_semaphore(name: str) -> bool:
    """Before ``sem_open`` of an existing semaphore: its file must pass ``check_own`` (by
    ``lstat``: a symlink is refused, not followed). False if there is none.

    Raises:
        ForeignObjectError: the file at the name is not ours.
    """
    path = _names.semaphore_path(name)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise SharedObjectError(error.errno, f"shmfeed: cannot look at semaphore {name!r}: {error.strerror}; "
                                f"check /dev/shm") from error
    check_own(info, path)
    return True


def open_semaphore(name: str) -> posix_ipc.Semaphore | None:
    """Open an existing named semaphore of ours; None if it does not exist.

    Raises:
        ForeignObjectError: the file at the name is not ours.
        SharedObjectError: it cannot be opened.
    """
    try:
        return Semaphore(name) if check_semaphore(name) else None
    except posix_ipc.ExistentialError:
        return None
    except posix_ipc.Error as error:
        raise SharedObjectError(
            f"shmfeed: cannot open semaphore {name!r}: {error}; check /dev/shm (shmfeed gc removes leftovers)"
        ) from error


def open_native(name: str) -> int:
    """A libc handle (``sem_open``) of an existing semaphore of ours, for ``native_wait``.

    Raises:
        ForeignObjectError: the file at the name is not ours.
        SharedObjectError: it is gone, or cannot be opened.
    """
    handle = libc.sem_open(name.encode(), 0) if check_semaphore(name) else None
    if not handle:
        raise SharedObjectError(f"shmfeed: cannot open semaphore {name!r}; check /dev/shm (shmfeed gc removes leftovers)")
    return int(handle)


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
    return TimeoutError(f"shmfeed: timed out waiting for {lock}, held by {holder}; try again, or give a longer timeout")
