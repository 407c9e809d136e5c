"""Large values as files in /dev/shm, linked into each receiving channel.

A value too large for a channel's ring is written once per send into a file, and the file
is hard-linked once per receiving channel; each receiver unlinks its link after reading,
so the kernel frees the data when the last one has read it.

Allocating fresh tmpfs pages costs far more than copying into pages that exist (about
400 µs against 25 µs for 1 MiB here), and a ``pwrite``/``read`` costs three times a
``memcpy`` into a mapping, so:

- each sending process keeps a pool of its own spill files, kept mapped: a file whose link
  count is back to 1 (every receiver has read and unlinked its link) is rewritten in place,
  by a copy into its mapping, for the next large value. A file still linked somewhere is
  never touched. Pool files carry the sender's pid, so ``shmfeed gc`` removes those of
  dead processes;
- each receiving process keeps the last few files it read mapped (keyed by inode), so a
  pool file that comes round again is read by one copy, with no mapping or page faults.
  It reads a file only while it holds a link to it, and so while no sender rewrites it.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import platform
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from . import _names, _native, _process, _shm
from ._codec import Segments
from ._largecopy import CopyChooser

POOL_FILES = 32  # per process and namespace ...
POOL_BYTES = 256 << 20  # ... and no more bytes than this in them
READER_MAPPINGS = 16  # files a receiving process keeps mapped ...
READER_MAPPED_BYTES = 128 << 20  # ... holding no more than this
READER_MAP_MIN = 64 << 10  # smaller files are simply read


_copier = CopyChooser(_native.accel.copy_into if _native.accel is not None else None)


def _fstat_link_count(descriptor: int) -> int:
    return os.fstat(descriptor).st_nlink


_link_count = _native.accel.link_count if _native.accel is not None else _fstat_link_count

MALLOC_OPT_OUT_ENV = "SHMFEED_NO_MALLOC_TUNING"
_malloc_tuned = False


def tune_malloc() -> None:
    """Once per process that moves large values: let glibc keep freed memory for reuse.

    By default glibc serves each allocation of a large value (the copy read, the decoded
    bytes) with fresh pages and returns them when it is freed, so every value pays a page
    fault per 4 KiB: measured here, it tripled the CPU cost of receiving 1 MiB values.
    Raising the mmap and trim thresholds (to 32 and 64 MiB) makes glibc reuse the freed
    memory instead. ``SHMFEED_NO_MALLOC_TUNING=1`` leaves malloc alone.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if os.environ.get(MALLOC_OPT_OUT_ENV) or platform.libc_ver()[0] != "glibc":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 64 << 20)


FREE, LINKED, LOST = range(3)  # a pool file's state()


class _PoolFile:
    __slots__ = ("path", "descriptor", "identity", "size", "busy", "mapping", "mark")

    def __init__(self, path: str, descriptor: int) -> None:
        self.path = path
        self.descriptor = descriptor
        info = os.fstat(descriptor)
        self.identity = (info.st_dev, info.st_ino)  # the file we made, to know it by its name
        self.size = 0
        self.busy = False  # taken by a send that has not finished linking
        self.mapping: mmap.mmap | None = None
        self.mark: int | None = None  # how the last copy wrote it (see _largecopy)

    def unmap(self) -> None:
        """Let go of the mapping (its pages stay mapped while a buffer made from it lives:
        a loan's buffer kept past its send without the C accelerator, or in a forked child)."""
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                pass  # unmapped when the last such buffer goes
            self.mapping = None

    def close(self) -> None:
        """Let go of the mapping and descriptor (idempotent: the number may be reused)."""
        self.unmap()
        if self.descriptor >= 0:
            descriptor, self.descriptor = self.descriptor, -1
            os.close(descriptor)

    def state(self) -> int:
        """FREE: no receiver links the file any more and its name is still the file we
        made; LINKED: a receiver still does; LOST for good: the name is gone or holds
        something else (gc may have removed a pool file it took for a dead process's, and
        another user may have put a file or a symlink there since).

        The descriptor we keep tells the link count (``_link_count``: cheap, and most
        files a scan asks about are still linked); only a file down to one link has its
        name looked at, by one ``lstat``: the descriptor holds the file, so no other live
        file has its number (short of tmpfs's inode counter wrapping round)."""
        try:
            links = _link_count(self.descriptor)
        except OSError:
            links = 1  # the descriptor closed under us (a daemonising closerange): the name tells
        if links != 1:
            return LINKED if links else LOST  # no link at all: our name is gone
        try:
            info = os.lstat(self.path)
        except OSError:
            return LOST
        if (info.st_dev, info.st_ino) != self.identity:
            return LOST
        return FREE if info.st_nlink == 1 else LINKED


_pools: dict[str, list[_PoolFile]] = {}
_pool_lock = threading.Lock()
NEWEST_TRIES = 4  # pool files tried newest first, before the rest oldest first


def _scan_order(count: int) -> Iterator[int]:
    """The order in which ``_take`` tries a pool of ``count`` files, kept in the order they
    were last taken: the newest few first, since the newest one receivers are done with is
    likeliest still in the caches, and mapped in each receiver's cache of mappings (one
    that goes round the whole pool, after a burst grew it past those, costs every receiver
    a new mapping and its page faults per value); the newest are the likeliest still
    being read, though, so past NEWEST_TRIES the oldest first, the likeliest free."""
    newest = max(0, count - NEWEST_TRIES)
    yield from range(count - 1, newest - 1, -1)
    yield from range(newest)


def _take(namespace: str, size: int) -> _PoolFile:
    """A pool file no receiver still reads, or a new one (unpooled if the pool is full)."""
    with _pool_lock:
        pool = _pools.setdefault(namespace, [])
        lost: list[_PoolFile] = []
        try:
            for index in _scan_order(len(pool)):
                entry = pool[index]
                if entry.busy:
                    continue
                state = entry.state()
                if state == FREE:
                    entry.busy = True
                    pool.append(pool.pop(index))
                    return entry
                if state == LOST:
                    lost.append(entry)
        finally:
            for entry in lost:  # its name is not ours now: let go of the file, remove nothing
                pool.remove(entry)
                entry.close()
        path = _names.spill_temp_file(namespace, _names.new_id())
        entry = _PoolFile(path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        entry.busy = True
        if len(pool) < POOL_FILES and sum(file.size for file in pool) + size <= POOL_BYTES:
            pool.append(entry)
        return entry


def give_back(namespace: str, entry: _PoolFile, keep: bool = True) -> None:
    """A send is done with a pool file; without ``keep`` (its write failed) the file goes."""
    with _pool_lock:
        entry.busy = False
        pool = _pools.get(namespace, [])
        if entry in pool and not keep:
            pool.remove(entry)
        if entry not in pool:
            entry.close()
            _unlink(entry.path)


_unlink = _shm.remove_file


def _size_and_map(file: _PoolFile, size: int) -> None:
    """Make a pool file hold at least ``size`` bytes, mapped in this process."""
    if file.size < size:
        # Files only grow: a receiver reads in place through a mapping, and a file that
        # shrank under a mapping would kill it with SIGBUS. The record gives the length.
        # Grown with its memory reserved: a copy into pages a full /dev/shm cannot back
        # would be a SIGBUS too (and receivers check that the value's blocks are there).
        file.unmap()
        _shm.reserve(file.descriptor, size, f"a large value of {size} bytes")
        file.size = size
    if file.mapping is None and file.size:
        file.mapping = mmap.mmap(file.descriptor, file.size)
        file.mark = None  # new pages: the next copy's timing would be spoilt


class Lent(Segments):
    """An encoded value already written in a pool file, at its start (``Feed.loan``):
    a send links that file as it is, with no copy. The parts are views of the file."""

    __slots__ = ("file",)

    def __init__(self, file: _PoolFile, size: int) -> None:
        assert file.mapping is not None
        super().__init__([memoryview(file.mapping)[:size]])
        self.file = file


def lend(namespace: str, size: int) -> _PoolFile:
    """A pool file of at least ``size`` bytes, mapped, for a value its borrower writes in
    place; ``give_back`` it when the send is over (or never happened).

    Raises:
        _shm.SharedObjectError: errno ENOSPC, /dev/shm cannot hold ``size`` bytes.
    """
    tune_malloc()
    file = _take(namespace, size)
    try:
        _size_and_map(file, size)
    except BaseException:
        give_back(namespace, file, keep=False)
        raise
    file.mark = None  # written by the borrower: no timing of ours to keep
    return file


class Spill:
    """One large value of one send, written once, linked into each channel that needs it."""

    def __init__(self, namespace: str, payload: bytes | memoryview | Segments) -> None:
        tune_malloc()
        self.namespace = namespace
        self.payload = payload
        self.parts: Sequence[bytes | memoryview] = payload.parts if isinstance(payload, Segments) else (payload,)
        self.lent = payload.file if isinstance(payload, Lent) else None  # its borrower gives it back
        self.file: _PoolFile | None = self.lent  # a lent file is written in place already

    def write(self) -> _PoolFile:
        """Write the value into a pool file, once; the file.

        A send calls this before any ring takes the value: a full /dev/shm then fails the
        whole send here, having delivered nothing, and the file goes (its space with it).

        Raises:
            _shm.SharedObjectError: errno ENOSPC, /dev/shm cannot hold the value.
        """
        if self.file is None:
            file = _take(self.namespace, len(self.payload))
            try:
                self._write(file)
            except BaseException:
                give_back(self.namespace, file, keep=False)
                raise
            self.file = file
        return self.file

    def link_into(self, namespace: str, channel_id: int) -> tuple[int, int]:
        """Link the value for one channel; returns ``(spill_id, size)`` for its record."""
        file = self.write()
        spill_id = _names.new_id()
        os.link(file.path, _names.spill_file(namespace, channel_id, spill_id))
        return spill_id, len(self.payload)

    def _write(self, file: _PoolFile) -> None:
        _size_and_map(file, len(self.payload))
        if file.mapping is not None:
            file.mark = _copier.copy(file.mapping, self.parts, file.mark)

    def close(self) -> None:
        if self.file is not None and self.file is not self.lent:
            give_back(self.namespace, self.file)
        self.file = None


def read(path: str, size: int) -> bytes | memoryview:
    """A receiver's read of its link to a large value.

    Small and very large values are read into bytes and the link removed at once. Others
    come as a view of the file mapped in this process, decoded in place: the link must
    outlive that decoding (while it exists no sender rewrites the file), so it is removed
    at this thread's next large read or when the process lets go of the namespace (and
    with the channel in any case).

    The file is opened through ``_shm.open_own`` (or, where this process keeps it mapped,
    ``lstat``-ed and checked the same way): a FIFO, a symlink or a file that is not ours at
    the link's name is refused (and left where it is).

    Raises OSError if the file is missing or not ours (``_shm.ForeignObjectError``),
    ValueError if it does not hold ``size`` bytes (a size read from shared memory is never
    trusted with an allocation).
    """
    unlink_deferred()  # what this thread read before is decoded by now
    view = _kept_view(path, size, READER_MAPPED_BYTES // 4)
    if view is not None:
        _defer_unlink(path)
        return view
    keep_link = False
    opened = False
    try:
        descriptor, info = _shm.open_own(path)
        opened = True
        try:
            _check_holds(info, size)
            tune_malloc()
            if not READER_MAP_MIN <= info.st_size <= READER_MAPPED_BYTES // 4:
                with open(descriptor, "rb", buffering=0, closefd=False) as spill:
                    return spill.read(size)
            with _reader_lock:
                view = memoryview(_mapped(descriptor, (info.st_dev, info.st_ino, info.st_size)))[:size]
            keep_link = True
            return view
        finally:
            os.close(descriptor)
    finally:
        if keep_link:
            _defer_unlink(path)
        elif opened:  # ours, read, or refused for its size
            _unlink(path)


def _defer_unlink(path: str) -> None:
    with _deferred_lock:
        _deferred.setdefault(threading.get_ident(), []).append(path)


def _checked_lstat(path: str, size: int) -> os.stat_result:
    """What ``open_own`` and ``_check_holds`` check, by ``lstat``: no descriptor to open and
    close. A file refused for its size is ours: its link goes.

    Raises as ``read``.
    """
    info = os.lstat(path)
    _shm.check_own(info, path)
    try:
        _check_holds(info, size)
    except ValueError:
        _unlink(path)
        raise
    return info


def _kept_view(path: str, size: int, most: int) -> memoryview | None:
    """The first ``size`` bytes of the file at ``path`` as a view of the mapping this
    process keeps of it (``_mapped``), found by an ``lstat`` of the path: three system
    calls fewer than opening it. None where none is kept (or the file is not between
    READER_MAP_MIN and ``most`` bytes): the caller opens it.

    Raises as ``read``.
    """
    if not _reader_maps:
        return None
    info = _checked_lstat(path, size)
    if not READER_MAP_MIN <= info.st_size <= most:
        return None
    with _reader_lock:
        mapping = _kept_mapping((info.st_dev, info.st_ino, info.st_size))
        return None if mapping is None else memoryview(mapping)[:size]


def read_kept(path: str, size: int) -> bytes:
    """A copy of a large value whose link stays where it is: a durable bridge's outbox
    reads without taking (``_peek``), and removes the link when it takes the record.

    Raises as ``read``.
    """
    descriptor, info = _shm.open_own(path)
    try:
        _check_holds(info, size)
        with open(descriptor, "rb", buffering=0, closefd=False) as spill:
            data = spill.read(size)
        if len(data) != size:
            raise ValueError(f"the record says {size} bytes, {len(data)} could be read")
        return data
    finally:
        os.close(descriptor)


def read_pinned(namespace: str, path: str, size: int) -> memoryview:
    """A receiver's read of its link to a large value as a read-only view of the file
    (``Channel.recv_view``): no copy. The link is first renamed to this process's own pin
    name (``_names.spill_pin_file``), so that while the view lives no sender rewrites the
    file and neither the channel's end nor a release of the namespace removes the link;
    the view is a ``Pin`` (``_accel.c``) that removes the pin link when the last memoryview,
    slice or NumPy array made from it is gone. Without the C accelerator, or for a small
    file, the value is read into bytes (a copy) and the link removed at once.

    Raises as ``read``.
    """
    if _native.accel is None:  # a copy: read() may give a view that its link outlives only briefly
        return memoryview(bytes(read(path, size)))
    info = _checked_lstat(path, size)
    if info.st_size < READER_MAP_MIN:
        return memoryview(read(path, size))  # read into bytes, the link removed
    pin_path = _names.spill_pin_file(namespace, _names.new_id())
    os.rename(path, pin_path)  # the name is ours (sticky /dev/shm): nobody swapped it since the lstat
    try:
        key = (info.st_dev, info.st_ino, info.st_size)
        with _reader_lock:
            mapping = _kept_mapping(key)
            if mapping is None:
                descriptor, opened = _shm.open_own(pin_path)
                try:
                    if (opened.st_dev, opened.st_ino, opened.st_size) != key:
                        raise ValueError("the file changed while it was read")
                    mapping = _mapped(descriptor, key)
                finally:
                    os.close(descriptor)
            return memoryview(_native.accel.Pin(mapping, 0, size, functools.partial(_unlink, pin_path)))
    except BaseException:
        _unlink(pin_path)
        raise


def _check_holds(info: os.stat_result, size: int) -> None:
    """A spill file must really hold the ``size`` bytes its record claims before anything of
    that size is allocated or mapped: as long (pool files only grow: the value is at their
    start), and that much of it in memory, since pool files are reserved, never sparse (a
    sparse file would let a record of any size make this process allocate it in zeros).

    Raises:
        ValueError: it does not.
    """
    if info.st_size < size:
        raise ValueError(f"the record says {size} bytes, the file holds {info.st_size}")
    if info.st_blocks * 512 < size:
        raise ValueError(f"the record says {size} bytes, the file has {info.st_blocks * 512} in memory (sparse)")


_deferred_lock = threading.Lock()
_deferred: dict[int, list[str]] = {}  # thread -> links kept for the values it reads in place


def unlink_deferred(namespace: str | None = None, every_thread: bool = False) -> None:
    """Remove the links kept for values read in place: this thread's (and those of threads
    that ended), or every thread's; of one namespace, or all."""
    if not _deferred:
        return
    me = threading.get_ident()
    with _deferred_lock:
        if every_thread:
            threads = list(_deferred)
        else:
            threads = [me]
            others = [thread for thread in _deferred if thread != me]
            if others:
                alive = {thread.ident for thread in threading.enumerate()}
                threads += [thread for thread in others if thread not in alive]
        start = _names.prefix(namespace) if namespace is not None else ""
        for thread in threads:
            paths = _deferred.get(thread, [])
            kept = [path for path in paths if not os.path.basename(path).startswith(start)]
            for path in paths:
                if os.path.basename(path).startswith(start):
                    _unlink(path)
            if kept:
                _deferred[thread] = kept
            else:
                _deferred.pop(thread, None)


_reader_lock = threading.Lock()
# (device, inode, size) -> (a descriptor of the file, its mapping), least recently used first.
_reader_maps: "OrderedDict[tuple[int, int, int], tuple[int, mmap.mmap]]" = OrderedDict()


def _kept_mapping(key: tuple[int, int, int]) -> mmap.mmap | None:
    """The mapping kept of the file ``key`` names, if any (reader lock held)."""
    cached = _reader_maps.get(key)
    # Still linked somewhere, it is the very file we found (an inode number is unique
    # among existing files); unlinked everywhere, its number may belong to a new file.
    if cached is not None and _link_count(cached[0]):
        _reader_maps.move_to_end(key)
        return cached[1]
    return None


def _mapped(descriptor: int, key: tuple[int, int, int]) -> mmap.mmap:
    """A read-only mapping of the open file ``descriptor`` (reader lock held)."""
    found = _kept_mapping(key)
    if found is not None:
        return found
    # A miss: first let go of files nobody links any more (their sender left), then of the
    # least recently used, so that few and small enough mappings keep memory alive.
    for old_key, (old_descriptor, _) in list(_reader_maps.items()):
        if os.fstat(old_descriptor).st_nlink == 0:
            _forget_mapping(old_key)
    while _reader_maps and (
        len(_reader_maps) >= READER_MAPPINGS
        or sum(k[2] for k in _reader_maps) + key[2] > READER_MAPPED_BYTES
    ):
        _forget_mapping(next(iter(_reader_maps)))
    kept = os.dup(descriptor)
    try:
        mapping = mmap.mmap(kept, key[2], prot=mmap.PROT_READ)
    except BaseException:
        os.close(kept)
        raise
    _reader_maps[key] = (kept, mapping)
    return mapping


_retired: list[tuple[int, mmap.mmap]] = []  # forgotten while a view was still being decoded


def _forget_mapping(key: tuple[int, int, int]) -> None:
    _retired.append(_reader_maps.pop(key))
    for entry in list(_retired):
        kept, mapping = entry
        try:
            mapping.close()
        except BufferError:
            continue  # a view of it is alive: try again at the next forgetting
        _retired.remove(entry)
        os.close(kept)


def forget_reader_mappings() -> None:
    """Let go of every file this process keeps mapped for reading."""
    with _reader_lock:
        for key in list(_reader_maps):
            _forget_mapping(key)


def release_pools(namespace: str | None = None) -> None:
    """Close and unlink this process's pool files (links held by channels stay valid).

    At exit nothing is unmapped: a daemon thread may still copy into or read from it.
    """
    exiting = _process.exiting()
    with _pool_lock:
        for key in [k for k in _pools if namespace is None or k == namespace]:
            for entry in _pools.pop(key):
                if not entry.busy and not exiting:  # a send in another thread closes it
                    entry.close()
                _unlink(entry.path)
    unlink_deferred(namespace, every_thread=True)
    if not exiting:
        forget_reader_mappings()


def _forget_after_fork() -> None:
    # The parent's pool files are the parent's: the child makes its own (named by its pid).
    global _copier, _pool_lock, _reader_lock, _deferred_lock
    _copier = CopyChooser(_copier.streaming_copy)  # the child runs where the parent did not
    _pool_lock = threading.Lock()
    _reader_lock = threading.Lock()
    _deferred_lock = threading.Lock()
    _deferred.clear()  # the parent's reads: the parent removes those links
    for pool in _pools.values():
        for entry in pool:
            entry.close()
    _pools.clear()
    forget_reader_mappings()


_process.on_exit(release_pools)
_process.on_fork_child(_forget_after_fork)
