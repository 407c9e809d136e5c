"""One channel's ring in shared memory: records, locking, waiting and waking, large values.

A ``ChannelCore`` is this process's handle on one channel segment (layout in ``_layout``);
every ``Channel`` object of the same channel in a process shares one core.

Ring records are 8-byte aligned: a header of two little-endian u32 (payload length, kind)
and the payload. A record is committed by advancing ``WRITE_POS`` and ``SENT`` after the
bytes are in place, all under the lock, so a reader never sees a half-written message.
Kinds:

| kind  | payload                                                                  |
|-------|--------------------------------------------------------------------------|
| DATA  | the encoded value                                                        |
| WRAP  | none: the rest of the ring is unused, the next record is at offset 0    |
| SPILL | (spill id u64, size u64): the value is in the file ``_names.spill_file`` |

A value whose record would exceed a quarter of the ring travels as a spill file (see
``_spill``): written once per send, hard-linked once per receiving channel, and unlinked
by each receiver after reading.
Everything read from the ring is validated; bad bytes raise ``ChannelCorruptError``.
"""

from __future__ import annotations

import glob
import mmap
import os
import platform
import struct
import threading
import sys
import time
import weakref
from typing import Any, Callable

from . import _layout as L
from . import _names, _native, _outbox, _process, _shm, _spare_cpu, _spill, _waker
from ._codec import Segments
from ._spill import Spill
from ._segment import AttachedSegment, open_named
from ._errors import ChannelClosed, ChannelCorruptError, TableFullError

# The "what to do" halves of messages raised in several places.
CLOSED_FIX = "a closed channel stays closed (any process may close it): receive from or send to another"
CORRUPT_RECORD_FIX = "that value is lost; the channel goes on (a sender of another shmfeed version, or damage)"

RECORD_HEADER = struct.Struct("<II")
_pack_record_header = RECORD_HEADER.pack_into
_unpack_record_header = RECORD_HEADER.unpack_from
SPILL_REFERENCE = struct.Struct("<QQ")
KIND_DATA, KIND_WRAP, KIND_SPILL = 1, 2, 3
MIN_RING_BYTES = L.MIN_RING_BYTES
MAX_RECORD_BYTES = 0xFFFF_FFF0

OVERFLOW_POLICIES = ("block", "drop_newest", "drop_oldest", "evict")
OVERFLOW_CODES = {name: code for code, name in enumerate(OVERFLOW_POLICIES)}

RECOVERY_LOCK_TIMEOUT = 0.2  # seconds the registry waits for a lock before moving on

# Outcomes of an offer.
DELIVERED, FULL, CLOSED, DROPPED = 0, 1, 2, 3

# Spin-before-sleep (see ChannelCore._spin): nanoseconds a receiver that found the ring
# empty polls it before it sleeps, while such spins pay; halved by each that does not; and
# only while the machine has a CPU to spare (_spare_cpu). Off unless SHMFEED_SPIN_NS is
# set: measured here (2 cores), 40000 takes a ping-pong's one-way p50 from 35 to 2 us on a
# quiet machine, but a spin that ignored the machine's load halved a fan-out's throughput
# while other CPU-bound work shared it, and with the spare-CPU condition a 2-subscriber
# fan-out still lost about a fifth in one run (a spinning receiver holds a CPU others need).
SPIN_MAX_NS = int(os.environ.get("SHMFEED_SPIN_NS", "0") or 0)
SPIN_MIN_NS = 2_000  # below this a spin is not tried, but every SPIN_PROBE_EVERY empties
SPIN_PROBE_EVERY = 64

# Yield-before-sleep tuning (see ChannelCore._should_yield).
YIELD_CREDIT_MAX = 32
YIELD_MISS_COST = 1
# A yield that took this long gave the CPU to another task for a time slice (a nice-19
# task included: measured, 0.4 to 4.6 ms); one that did so and did not pay spends the
# credit at once.
YIELD_SLOW_NS = 200_000

# Receivers read the senders' positions without the send lock only where aligned 8-byte
# stores are atomic and ordered (x86); elsewhere they take the send lock as well.
SINGLE_LOCK = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686")

_pid = os.getpid()

# Set by ``pinning()`` in a thread taking a value to hand out as a view (Channel.recv_view).
_pinning = threading.local()


class pinning:
    """Within: a large value this thread takes is read as a pinned view of its spill file
    (``_spill.read_pinned``), not copied."""

    def __enter__(self) -> None:
        _pinning.on = True

    def __exit__(self, *exc_info: object) -> None:
        _pinning.on = False

# An encoded value or record: bytes, or a view of a packer's buffer (see _codec.encode_for_send).
Payload = bytes | memoryview
# What a send starts from: a Payload, or a large value in parts (joined if it goes inline).
Encoded = bytes | memoryview | Segments


# This process's entry in each channel's readers table, by channel id (the Python path's
# hint for _layout.note_reader; the C path keeps its own in its Ring).
_reader_hints: dict[int, int] = {}

_accel = _native.accel  # the C hot path, or None: the Python path below
ACCEL_WORDS = (L.WRITE_POS, L.READ_POS, L.SENT, L.RECEIVED, L.CLOSED, L.CAPACITY,
               L.LOCK_OWNER, L.RECV_LOCK_OWNER, L.RECV_WAITING, L.SEND_WAITING, L.WAIT_LOCK_OWNER,
               L.LAST_RECV_PID, L.LAST_RECV_TIME, L.READERS_FIRST_WORD, L.READERS_LAST_WORD, L.DROPPED, L.SPILLED)


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


def _unlink_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def default_ring_bytes(capacity: int) -> int:
    """Ring size for ``capacity`` messages when the user gives none: 512 bytes each."""
    return _align(min(max(capacity * 512, 64 * 1024), 256 * 1024 * 1024), L.PAGE)


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


_DELIVERED_MARK = "_shmfeed_delivered"


def _mark_delivered(error: BaseException) -> None:
    """Note on ``error`` that it came after its value was committed to a ring."""
    try:
        setattr(error, _DELIVERED_MARK, True)
    except (AttributeError, TypeError):
        pass


def delivered_despite() -> bool:
    """In a ``finally`` block: whether the exception leaving it came after the value was
    committed (see ``ChannelCore.offer``), so the value's spill file must stay."""
    error = sys.exc_info()[1]
    return error is not None and bool(getattr(error, _DELIVERED_MARK, False))


class ChannelCore(AttachedSegment):
    """This process's attachment to one channel segment (shared by its Channel objects).

    Senders take the send lock, receivers the receive lock; a sender and a receiver never
    wait for each other. A side that must sleep registers its waker under the wait-list
    lock and then checks once more; the other side, after committing (and after the full
    barrier of releasing its own lock), wakes the registered wakers. Either the sleeper
    sees the change or the changer sees the sleeper: no wake-up is lost.

    Deadlines (``time.monotonic()`` values, None for none) bound every lock wait that comes
    before a value is committed or taken: the send and receive locks, which another process
    may hold across a copy of any size, and the wait-list lock when registering. A wait
    that reaches its deadline raises ``TimeoutError`` having changed nothing. Two steps
    take the wait-list lock with no deadline, because they must happen: the wake-up after
    a commit (else a sleeping peer never hears of it) and taking one's own waker out of a
    list on the way out. That lock is only ever held for a few word writes and posts, and
    its holder never waits for anything while holding it (it is last in the lock order),
    so a live holder lets go at once; a dead one is released by recovery.
    """

    kind = L.CHANNEL_KIND

    def __init__(
        self, namespace: str, channel_id: int, mapping: mmap.mmap, locks: tuple[Any, Any, Any]
    ) -> None:
        self._setup_segment(namespace, _names.channel_segment(namespace, channel_id), mapping)
        self.channel_id = channel_id
        self.send_lock, recv_lock, self.wait_lock = locks
        self.segment_lock = self.send_lock  # the send lock also guards the header
        self.recv_lock = self.send_lock if SINGLE_LOCK else recv_lock
        self._own_recv_lock = recv_lock
        self.ring_bytes = int(self.words[L.RING_BYTES])
        self.capacity = int(self.words[L.CAPACITY])
        self.spill_threshold = self.ring_bytes // 4
        # Longest payload that travels inline: its record fits a quarter of the ring and
        # its length fits the record header's u32.
        self.inline_limit = min(self.spill_threshold, MAX_RECORD_BYTES) - 8
        self.overflow = OVERFLOW_POLICIES[int(self.words[L.OVERFLOW]) % len(OVERFLOW_POLICIES)]
        self.elem_type_name = L.read_text(
            self.buffer, L.TYPE_NAME_OFFSET, int(self.words[L.ELEM_TYPE_LEN]), L.TYPE_NAME_MAX
        )
        self._spin_state = [SPIN_MAX_NS, SPIN_PROBE_EVERY]  # budget (ns), empties to the next probe: _spin
        # credit, woken from a sleep since the ring was last found empty, the last yield
        # was slow: _should_yield (one list: see test_channel on the count of attributes)
        self._yield_state = [YIELD_CREDIT_MAX, False, False]
        self._yielded = False
        self._taken_since_empty = 0
        self.large_values = False  # the last value sent from here was large (see _codec)
        self.holders = 0  # Channel objects of this process (see hold)
        self._fast: Any = None
        if _accel is not None and not isinstance(self.send_lock, _shm.BoundedLock):
            # The registry's bounded locks (map_unattached) stay on the Python path.
            send_name = _names.lock_semaphore(namespace, int(self.words[L.LOCK_ID]))
            recv_word = L.LOCK_ID if SINGLE_LOCK else L.RECV_LOCK_ID
            recv_name = _names.lock_semaphore(namespace, int(self.words[recv_word]))
            wait_name = _names.lock_semaphore(namespace, int(self.words[L.WAIT_LOCK_ID]))
            waker_prefix = _names.waker_semaphore(namespace, 0)[:-16]
            try:
                self._fast = _accel.Ring(mapping, send_name, recv_name, wait_name, waker_prefix,
                                         L.HEADER_BYTES, self.ring_bytes, L.WAITLIST_SLOTS, ACCEL_WORDS)
                if self.overflow == "drop_newest":
                    self._fast.set_drop_newest()  # a C feed send drops and counts here, as offer does
            except OSError:
                pass  # destroyed meanwhile (a lock is gone): the Python path says so in time

    def describe(self) -> str:
        return f"channel {self.channel_id:016x}"

    def _spin(self, fast: Any, deadline: float | None) -> bytes | memoryview | None:
        """Poll the ring (the C poll: no lock held between tries) for a short while before
        sleeping: a reply that comes within microseconds then costs no sleep and wake-up
        (the latency of a ping-pong is mostly those). Adaptive: a spin that got a value
        keeps the budget at SPIN_MAX_NS, one that did not halves it, and below SPIN_MIN_NS
        it is tried only every SPIN_PROBE_EVERY empties, so a receiver that waits long uses
        no measurable CPU."""
        state = self._spin_state
        budget = state[0]
        if budget < SPIN_MIN_NS:
            state[1] -= 1
            if state[1] > 0:
                return None
            state[1] = SPIN_PROBE_EVERY
            budget = SPIN_MIN_NS
        end = time.perf_counter_ns() + budget
        if deadline is not None:
            end = min(end, time.perf_counter_ns() + int(max(0.0, deadline - time.monotonic()) * 1e9))
        poll, now = fast.poll, time.perf_counter_ns
        while True:
            data = poll(_pid)
            if data is None:
                return self.poll(None, deadline)  # odd, closed or locked: the Python poll decides
            if data is not False:
                state[0] = SPIN_MAX_NS
                if self.words[L.SEND_WAITING]:
                    self._wake(L.SEND_WAITLIST_WORD, L.SEND_WAITING)
                self._taken_since_empty = 1
                return data
            if now() >= end:
                state[0] = budget // 2
                return None

    def _should_yield(self) -> bool:
        """Whether a receiver that found the ring empty should yield the CPU once.

        A yield pays when the sender shares our CPU and fills the ring meanwhile: the next
        drain then takes several values. When values come one at a time anyway (ping-pong),
        a yield only hands the CPU to whatever else is runnable, possibly for a whole
        time slice. So yields earn credit and spend it: one whose drain took several
        values earns one, one that did not costs one, and one that did not and took a time
        slice (another task ran: a nice-19 one holds the CPU for a millisecond or more)
        spends it all. A sleep whose wake-up found several values earns one as well: the
        sender wrote on while we were not running, as a yield would have let it. There is
        no blind try once the credit is spent: under load such tries were the slowest
        round trips of a busy ping-pong (most of the first few each took a time slice).
        """
        state = self._yield_state
        if self._taken_since_empty >= 2 and (self._yielded or state[1]):
            state[0] = min(state[0] + 1, YIELD_CREDIT_MAX)
        elif self._yielded:
            state[0] = 0 if state[2] else max(state[0] - YIELD_MISS_COST, 0)
        self._yielded = state[1] = False
        self._taken_since_empty = 0
        return bool(state[0])

    def _yield(self) -> None:
        """Yield the CPU once (``_should_yield`` said so), noting whether it took long."""
        started = time.perf_counter_ns()
        os.sched_yield()
        self._yield_state[2] = time.perf_counter_ns() - started > YIELD_SLOW_NS
        self._yielded = True

    # --- creation and lifetime -------------------------------------------------------

    @classmethod
    def create(
        cls, namespace: str, capacity: int, ring_bytes: int, overflow: str, elem_type_name: str, flags: int = 0,
        label: str | None = None,
    ) -> "ChannelCore":
        lock_ids = (_names.new_id(), _names.new_id(), _names.new_id())
        lock_names = [_names.lock_semaphore(namespace, lock_id) for lock_id in lock_ids]
        locks: list[Any] = []

        def initialise(mapping: mmap.mmap) -> None:
            buffer = memoryview(mapping)
            words = buffer[: L.HEADER_BYTES].cast("Q")
            L.init_common(words, L.CHANNEL_MAGIC, lock_ids[0])
            words[L.RECV_LOCK_ID] = lock_ids[1]
            words[L.WAIT_LOCK_ID] = lock_ids[2]
            words[L.RING_BYTES] = ring_bytes
            words[L.CAPACITY] = capacity
            words[L.OVERFLOW] = OVERFLOW_CODES[overflow]
            words[L.CHANNEL_FLAGS] = flags
            words[L.ELEM_TYPE_LEN] = L.write_text(buffer, L.TYPE_NAME_OFFSET, L.TYPE_NAME_MAX, elem_type_name)
            if label:
                words[L.CHANNEL_NAME_LEN] = L.write_text(buffer, L.CHANNEL_NAME_OFFSET, L.CHANNEL_NAME_MAX, label)
            words.release()
            buffer.release()

        try:
            for name in lock_names:
                locks.append(_shm.create_semaphore(name, 1))
            while True:
                channel_id = _names.new_id()
                name = _names.channel_segment(namespace, channel_id)
                mapping = _shm.create_segment(name, L.HEADER_BYTES + ring_bytes, initialise)
                if mapping is not None:
                    break
        except BaseException:
            for name in lock_names:
                _shm.unlink_semaphore(name)
            raise
        core = cls(namespace, channel_id, mapping, (locks[0], locks[1], locks[2]))
        _register_core(core)
        return core

    @classmethod
    def open(cls, namespace: str, channel_id: int, deadline: float | None = None) -> "ChannelCore | None":
        """Attach to an existing channel; None if it no longer exists.

        Raises:
            TimeoutError: its send lock (which guards the attach slots) was still held by
                another process or thread at ``deadline``.
        """
        core = _cores.get((namespace, channel_id))
        if core is not None and not core.released:
            return core
        core = cls.map_unattached(namespace, channel_id, lock_timeout=None)
        if core is None:
            return None
        try:
            joined = core.join(deadline)
        except BaseException:
            core._close_local()
            raise
        if not joined:
            core._close_local()
            return None
        _register_core(core)
        return core

    @classmethod
    def map_unattached(
        cls, namespace: str, channel_id: int, lock_timeout: float | None = RECOVERY_LOCK_TIMEOUT
    ) -> "ChannelCore | None":
        """Map a channel without joining its attach slots (for the registry and gc).

        With ``lock_timeout`` (the default, for recovery) its locks give up after that many
        seconds with ``_shm.LockBusy``; ``open`` passes None for ordinary blocking locks.
        """
        opened = open_named(namespace, _names.channel_segment(namespace, channel_id), cls.kind, ChannelCorruptError)
        if opened is None:
            return None
        mapping, locks = opened
        if lock_timeout is not None:
            locks = [_shm.BoundedLock(lock, lock_timeout) for lock in locks]
        core = cls(namespace, channel_id, mapping, (locks[0], locks[1], locks[2]))
        core.attached = False
        return core

    def _close_local(self) -> None:
        fast = getattr(self, "_fast", None)  # absent if __init__ failed early
        if fast is not None:
            fast.release()  # its hold on the mapping first, or the mapping stays
        super()._close_local()

    def _outlives_holders(self) -> bool:
        return _outbox.is_kept(self.namespace, self.channel_id, int(self.words[L.CHANNEL_FLAGS]))

    def _before_detach(self) -> None:
        if _cores.get((self.namespace, self.channel_id)) is self:
            _cores.pop((self.namespace, self.channel_id), None)
        _reader_hints.pop(self.channel_id, None)

    # --- holders: processes that hold a Channel object of this channel -----------------

    def hold(self) -> None:
        """One more ``Channel`` object of this process refers to this channel."""
        self.holders += 1
        if self.holders == 1:
            L.set_own_flag(self.words, L.SLOT_HOLDER, True)

    def let_go(self) -> bool:
        """One ``Channel`` object fewer. When it was this process's last and no live
        process holds one any more, close the channel: nobody can ever read it, so its
        subscriptions end and sends waiting on it return. True if this closed it."""
        self.holders -= 1
        if self.holders > 0 or self.released or _process.exiting():
            return False
        L.set_own_flag(self.words, L.SLOT_HOLDER, False)
        holders = L.attached_processes(self.words, L.SLOT_HOLDER)
        if self.closed or self.words[L.IN_FLIGHT] or any(L.slot_alive(*p) for p in holders):
            return False
        if self.words[L.CHANNEL_FLAGS] & L.FLAG_OUTBOX:
            return False  # a durable bridge's outbox: closed by the bridge, or kept (_outbox)
        self.close()
        return True

    def count_in_flight(self, change: int) -> None:
        """A reference to the channel was pickled (+1) or unpickled (-1, never below 0).

        Between the two, no process may hold a Channel object of it, yet one will: the
        channel must not be taken for abandoned (see ``let_go``).
        """
        self.acquire()
        try:
            self.words[L.IN_FLIGHT] = max(0, int(self.words[L.IN_FLIGHT]) + change)
        finally:
            self.release_lock()

    def reattach_after_fork(self) -> None:
        super().reattach_after_fork()
        if self.holders and self.attached:  # the child holds the parent's Channel objects too
            L.set_own_flag(self.words, L.SLOT_HOLDER, True)

    def _unlink_files(self) -> None:
        """The spill files still linked to the channel (``unlink_names``): ours only. A file
        another user planted under such a name (channel ids show in /dev/shm) is not ours to
        remove (nor could we, /dev/shm being sticky), and must not keep the segment."""
        for path in glob.glob(_names.spill_file(self.namespace, self.channel_id, 0)[:-16] + "*"):
            if _shm.is_own(path):
                _unlink_file(path)

    def lock_semaphores(self) -> list[Any]:
        return [self.send_lock, self._own_recv_lock, self.wait_lock]

    # --- locking ----------------------------------------------------------------------

    def _lock_name(self) -> str:
        return f"the send lock of channel {self.channel_id:016x}"

    def _held(self, which: str, owner_word: int) -> TimeoutError:
        """The error of a wait for one of the channel's locks that reached its deadline."""
        return _shm.lock_timeout(f"the {which} lock of channel {self.channel_id:016x}", int(self.words[owner_word]))

    def _lock_waitlists(self, deadline: float | None = None) -> None:
        if not self.wait_lock.acquire_by(deadline):
            raise self._held("wait-list", L.WAIT_LOCK_OWNER)
        self.words[L.WAIT_LOCK_OWNER] = _pid

    def _unlock_waitlists(self) -> None:
        self.words[L.WAIT_LOCK_OWNER] = 0
        self.wait_lock.release()

    def _waitlist_add(
        self, first_word: int, count_word: int, waker: _waker.Waker, deadline: float | None = None
    ) -> None:
        self._lock_waitlists(deadline)
        try:
            if not L.waitlist_add(self.words, first_word, count_word, waker.waker_id):
                side = "receivers" if first_word == L.RECV_WAITLIST_WORD else "senders"
                raise TableFullError(
                    f"shmfeed: {L.WAITLIST_SLOTS} {side} already wait on channel {self.channel_id:016x}, "
                    f"the most its wait list holds; use fewer waiting threads or more channels"
                )
        finally:
            self._unlock_waitlists()

    def _waitlist_remove(
        self, first_word: int, count_word: int, waker: _waker.Waker, deadline: float | None = None
    ) -> None:
        if not self.words[count_word]:
            return
        self._lock_waitlists(deadline)
        try:
            L.waitlist_remove(self.words, first_word, count_word, waker.waker_id)
        finally:
            self._unlock_waitlists()

    def _wake(self, first_word: int, count_word: int) -> None:
        """Post every waker of one wait list (call after releasing a side lock).

        The posts happen before the list is cleared, under the wait-list lock: a process
        killed half-way leaves the wakers it had not posted yet in the list, and recovery
        posts them. No deadline: see the class docstring.
        """
        if self._fast is not None and self._fast.wake(first_word, count_word, _pid):
            return  # the same steps, in C (False: the lock was taken, so wait for it here)
        self._lock_waitlists()
        try:
            L.waitlist_post_all(self.words, first_word, count_word, self.namespace)
        finally:
            self._unlock_waitlists()

    # --- records ----------------------------------------------------------------------

    def _write_locked(self, kind: int, payload: Payload) -> bool:
        """Append one record if it fits now; False if the ring is full (send lock held).

        The bytes go in first and WRITE_POS, the commit, last: a receiver never sees a
        partial record, and a sender that dies before the commit leaves nothing behind.
        """
        words = self.words
        if words[L.SENT] - words[L.RECEIVED] >= self.capacity:
            return False
        size = len(payload)
        record = 8 + ((size + 7) & ~7)
        ring = self.ring_bytes
        write_pos = words[L.WRITE_POS]
        offset = write_pos % ring
        if offset & 7:  # records are 8-aligned: only a damaged header says otherwise
            raise ValueError(f"write position {write_pos} is not a multiple of 8")
        room_to_end = ring - offset
        need = record if record <= room_to_end else room_to_end + record
        if write_pos - words[L.READ_POS] + need > ring:
            return False
        base = L.HEADER_BYTES
        buffer = self.buffer
        if record > room_to_end:
            RECORD_HEADER.pack_into(buffer, base + offset, 0, KIND_WRAP)
            offset = 0
        RECORD_HEADER.pack_into(buffer, base + offset, size, kind)
        start = base + offset + 8
        buffer[start : start + size] = payload
        words[L.SENT] += 1
        if kind == KIND_SPILL:
            words[L.SPILLED] += 1
        words[L.WRITE_POS] = write_pos + need
        return True

    def _read_locked(self) -> tuple[int, bytes] | None:
        """Take the oldest record, or None if the ring is empty (receive lock held)."""
        words = self.words
        read_pos = words[L.READ_POS]
        available = words[L.WRITE_POS] - read_pos
        if not available:
            return None
        ring = self.ring_bytes
        offset = read_pos % ring
        base = L.HEADER_BYTES
        if offset & 7 or available < 0:  # records are 8-aligned: anything else is corrupt
            self._discard_corrupt_locked()
            raise ChannelCorruptError(
                f"shmfeed: channel {self.channel_id:016x} has a corrupt read position; "
                f"its waiting messages were discarded"
            )
        size, kind = RECORD_HEADER.unpack_from(self.buffer, base + offset)
        if kind == KIND_WRAP and available > ring - offset:
            skipped = ring - offset
            read_pos += skipped
            available -= skipped
            offset = 0
            size, kind = RECORD_HEADER.unpack_from(self.buffer, base)
        record = 8 + ((size + 7) & ~7)
        if kind not in (KIND_DATA, KIND_SPILL) or offset + record > ring or record > available or available > ring:
            self._discard_corrupt_locked()
            raise ChannelCorruptError(
                f"shmfeed: channel {self.channel_id:016x} holds corrupt bytes at ring offset "
                f"{offset} (kind {kind}, length {size}); its waiting messages were discarded"
            )
        start = base + offset + 8
        data = self.buffer[start : start + size].tobytes()
        words[L.RECEIVED] += 1
        words[L.READ_POS] = read_pos + record
        return kind, data

    def _corrupt_header(self, error: Exception) -> ChannelCorruptError:
        return ChannelCorruptError(
            f"shmfeed: channel {self.channel_id:016x} has a corrupt header ({error}); "
            f"it cannot be used safely"
        )

    def _discard_corrupt_locked(self) -> None:
        words = self.words
        words[L.READ_POS] = words[L.WRITE_POS]
        sent = words[L.SENT]
        words[L.DISCARDED] = min(L.U64_MAX, words[L.DISCARDED] + max(0, sent - words[L.RECEIVED]))
        words[L.RECEIVED] = sent

    def _materialise(self, kind: int, data: bytes) -> bytes | memoryview:
        """The encoded value of a record (reads a spill file: see ``_spill.read``, or
        ``_spill.read_pinned`` for a receive as a view: ``pinning``)."""
        if kind == KIND_DATA:
            return data
        if len(data) != SPILL_REFERENCE.size:
            raise ChannelCorruptError(f"shmfeed: channel {self.channel_id:016x}: bad spill record; {CORRUPT_RECORD_FIX}")
        spill_id, size = SPILL_REFERENCE.unpack(data)
        path = _names.spill_file(self.namespace, self.channel_id, spill_id)
        try:
            value: bytes | memoryview
            if getattr(_pinning, "on", False):
                value = _spill.read_pinned(self.namespace, path, size)
            else:
                value = _spill.read(path, size)
        except (OSError, ValueError) as error:
            raise ChannelCorruptError(
                f"shmfeed: channel {self.channel_id:016x}: a large value's file is missing or not valid ({error}); "
                f"{CORRUPT_RECORD_FIX}"
            ) from error
        if len(value) != size:
            raise ChannelCorruptError(
                f"shmfeed: channel {self.channel_id:016x}: a large value was truncated; {CORRUPT_RECORD_FIX}"
            )
        return value

    def _write_dropping_oldest(self, kind: int, record: Payload, deadline: float | None) -> bool:
        """Write ``record``, discarding the oldest records while it does not fit (send lock
        held); False if it does not fit even an empty ring. With the receive lock held the
        write is tried again before each discard: a receiver that was taking a value while
        this send waited for that lock has made room, and the oldest value still there
        must not go for nothing (the newest ``capacity`` values are the ones kept)."""
        own_lock = self.recv_lock is not self.send_lock
        if own_lock:
            if not self.recv_lock.acquire_by(deadline):
                raise self._held("receive", L.RECV_LOCK_OWNER)
            self.words[L.RECV_LOCK_OWNER] = _pid
        try:
            while not self._write_locked(kind, record):
                try:
                    taken = self._read_locked()
                except ChannelCorruptError:
                    continue  # its records were discarded: the ring is empty now
                if taken is None:
                    return False
                if taken[0] == KIND_SPILL:
                    self._unlink_spill_record(taken[1])
                self.words[L.DROPPED] += 1
            return True
        finally:
            if own_lock:
                self.words[L.RECV_LOCK_OWNER] = 0
                self.recv_lock.release()

    # --- the data path ------------------------------------------------------------------

    def record_for(self, payload: Encoded) -> tuple[int, Payload]:
        """The record kind and bytes that carry ``payload`` in this ring (one receiver)."""
        if len(payload) <= self.inline_limit:
            return KIND_DATA, payload.join() if isinstance(payload, Segments) else payload
        spill = Spill(self.namespace, payload)
        try:
            return KIND_SPILL, SPILL_REFERENCE.pack(*spill.link_into(self.namespace, self.channel_id))
        finally:
            spill.close()

    def offer_fast(self, payload: Payload, deadline: float | None = None,
                   mark: tuple[memoryview, int] | None = None, kind: int = KIND_DATA) -> int:
        """The common case of ``offer``: an inline record (or, ``kind`` KIND_SPILL, a large
        value's reference record), no waker: the C offer, and ``offer`` for whatever it
        leaves (or when there is no C path).

        Returns DELIVERED if written, else whatever ``offer`` decides. ``mark`` (a word of
        a feed's segment and a bit, see ``_marks``; inline records only): the C offer sets
        the bit right after its commit; the caller sets it on every other path.
        """
        fast = self._fast
        if fast is not None:
            if kind != KIND_DATA:
                outcome = fast.offer_spill(payload, _pid)
            else:
                outcome = fast.offer(payload, _pid) if mark is None else fast.offer(payload, _pid, *mark)
            if outcome == 0:
                return DELIVERED
            if outcome == 1:
                self._wake_after_commit()
                return DELIVERED
        return self.offer(kind, payload, None, deadline)  # full, odd, locked, or no C path

    def offer(
        self, kind: int, record: Payload, waker: _waker.Waker | None = None, deadline: float | None = None
    ) -> int:
        """Try to append a record now, applying the overflow policy if full.

        With ``waker``, a full ring (policy "block" or "evict") registers it in the send
        wait list, then checks once more, so that no wake-up is lost.
        Returns DELIVERED, FULL, DROPPED or CLOSED; raises ``TimeoutError``, having written
        nothing, if a lock it needs is still held by someone else at ``deadline``.
        """
        words = self.words
        send_lock = self.send_lock
        if not send_lock.acquire_by(deadline):
            raise self._held("send", L.LOCK_OWNER)
        words[L.LOCK_OWNER] = _pid
        try:
            if words[L.CLOSED]:
                return CLOSED
            if waker is not None:
                self._waitlist_remove(L.SEND_WAITLIST_WORD, L.SEND_WAITING, waker, deadline)
            if not self._write_locked(kind, record):
                overflow = self.overflow
                if overflow == "drop_newest":
                    words[L.DROPPED] += 1
                    return DROPPED
                if overflow == "drop_oldest":
                    if not self._write_dropping_oldest(kind, record, deadline):
                        return FULL
                else:
                    if waker is None:
                        return FULL
                    self._waitlist_add(L.SEND_WAITLIST_WORD, L.SEND_WAITING, waker, deadline)
                    if not self._write_locked(kind, record):
                        return FULL
        except ValueError as error:  # a counter or position at 2**64: a corrupt header
            raise self._corrupt_header(error) from error
        finally:
            words[L.LOCK_OWNER] = 0
            send_lock.release()
        # Read only after the release above (a full barrier) made the commit visible.
        if words[L.RECV_WAITING]:
            self._wake_after_commit()
        return DELIVERED

    def _wake_after_commit(self) -> None:
        """Wake the receivers of a value just committed; an exception meanwhile (a signal
        handler's: Ctrl-C) is marked delivered (``delivered_despite``): its file stays."""
        try:
            self._wake(L.RECV_WAITLIST_WORD, L.RECV_WAITING)
        except BaseException as error:
            _mark_delivered(error)
            raise

    def forget_sender(self, waker: _waker.Waker) -> None:
        """Take ``waker`` out of the send wait list (after a timeout or cancellation)."""
        self._waitlist_remove(L.SEND_WAITLIST_WORD, L.SEND_WAITING, waker)

    def put(self, payload: Encoded, timeout: float | None) -> int:
        """Blocking send of one encoded value; DELIVERED or DROPPED.

        Raises ``ChannelClosed``, or ``TimeoutError`` after ``timeout`` seconds (still full,
        or a lock still held by someone else: either way nothing was written).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        kind, record = self.record_for(payload)
        outcome = FULL
        try:
            outcome = self.offer_fast(record, deadline, None, kind)
            if outcome == FULL:
                outcome = self._put_waiting(kind, record, deadline)
        finally:
            if kind == KIND_SPILL and outcome != DELIVERED and not delivered_despite():  # not in the ring
                self._unlink_spill_record(record)
        if outcome == CLOSED:
            raise ChannelClosed(f"shmfeed: send on closed channel {self.channel_id:016x}; a closed channel stays closed")
        return outcome

    def put_nowait(self, payload: Encoded) -> int:
        """Append a value if there is room now (locks waited for, room not); DELIVERED,
        DROPPED or FULL. Raises ``ChannelClosed``."""
        kind, record = self.record_for(payload)
        outcome = FULL
        try:
            outcome = self.offer_fast(record, None, None, kind)
        finally:
            if kind == KIND_SPILL and outcome != DELIVERED and not delivered_despite():
                self._unlink_spill_record(record)
        if outcome == CLOSED:
            raise ChannelClosed(f"shmfeed: send on closed channel {self.channel_id:016x}; a closed channel stays closed")
        return outcome

    def put_if_room(self, payload: Encoded) -> bool:
        """Append a value if there is room now, waiting for the lock however long it takes
        (an error reported on a subscription's error channel); False if full or closed."""
        kind, record = self.record_for(payload)
        outcome = FULL
        try:
            outcome = self.offer(kind, record)
        finally:
            if kind == KIND_SPILL and outcome != DELIVERED and not delivered_despite():
                self._unlink_spill_record(record)
        return outcome == DELIVERED

    def _put_waiting(self, kind: int, record: Payload, deadline: float | None) -> int:
        waker = _waker.current_waker(self.namespace)
        try:
            while True:
                outcome = self.offer(kind, record, waker, deadline)
                if outcome != FULL:
                    return outcome
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"shmfeed: channel {self.channel_id:016x} stayed full; its receiver is slow or gone: "
                                       f"wait longer (timeout=None waits for ever), or give the channel more capacity")
                waker.wait(remaining)
        finally:
            self.forget_sender(waker)
            waker.drain()

    def _unlink_spill_record(self, record: Payload) -> None:
        spill_id, _ = SPILL_REFERENCE.unpack(record)
        _unlink_file(_names.spill_file(self.namespace, self.channel_id, spill_id))

    def poll_fast(self, deadline: float | None = None) -> bytes | memoryview | None:
        """The common case of ``poll``: the C poll of an inline record, and ``poll`` for
        whatever it leaves (empty, odd, locked) or when there is no C path."""
        fast = self._fast
        if fast is not None:
            data = fast.poll(_pid)
            if data is False:
                return None  # empty and open: the Python poll would say no more
            spilled = data is None
            if spilled:
                data = fast.take_spill(_pid)  # a large value's reference, or the Python poll's
                if data is None:
                    return self.poll(None, deadline)  # odd, closed, or locked
            if self.words[L.SEND_WAITING]:
                self.wake_senders()
            return self._materialise(KIND_SPILL, data) if spilled else data
        return self.poll(None, deadline)

    def take_common(self, nothing: Any, decode: Callable[[bytes], Any]) -> Any:
        """The oldest value, taken and decoded, when a receive is that simple: an inline
        record of a modest size (``Ring.take_one``: one C call for the common ``recv``),
        decoded by the C decoder or else by ``decode``, whose error is then the receive's.
        ``nothing`` otherwise, having taken nothing: ``take`` decides."""
        fast = self._fast
        if fast is None:
            return nothing
        # Senders waiting for room are woken in the call (wake_senders), before the decode:
        # also when the decode of a taken value fails, its room is free.
        value = fast.take_one(_pid, nothing, decode, self)
        if value is not nothing:
            self._taken_since_empty += 1
        return value

    def poll(self, waker: _waker.Waker | None = None, deadline: float | None = None) -> bytes | memoryview | None:
        """Take one encoded value if there is one.

        Returns None if empty (registering ``waker`` in the receive wait list, then
        checking once more); raises ``ChannelClosed`` if closed and drained, and
        ``TimeoutError``, having taken nothing, if a lock it needs is still held by someone
        else at ``deadline``.
        """
        words = self.words
        recv_lock = self.recv_lock
        if not recv_lock.acquire_by(deadline):
            raise self._held("receive", L.RECV_LOCK_OWNER)
        words[L.RECV_LOCK_OWNER] = _pid
        try:
            if waker is not None:
                self._waitlist_remove(L.RECV_WAITLIST_WORD, L.RECV_WAITING, waker, deadline)
            closed = words[L.CLOSED]  # read before the ring: what was sent before close is kept
            taken = self._read_locked()
            if taken is None:
                if closed:
                    raise ChannelClosed(f"shmfeed: channel {self.channel_id:016x} is closed; {CLOSED_FIX}")
                if waker is None:
                    return None
                self._waitlist_add(L.RECV_WAITLIST_WORD, L.RECV_WAITING, waker, deadline)
                closed = words[L.CLOSED]
                taken = self._read_locked()
                if taken is None:
                    if closed:
                        raise ChannelClosed(f"shmfeed: channel {self.channel_id:016x} is closed; {CLOSED_FIX}")
                    return None
            self._note_receiver()
        except ValueError as error:  # a counter or position at 2**64: a corrupt header
            raise self._corrupt_header(error) from error
        finally:
            words[L.RECV_LOCK_OWNER] = 0
            recv_lock.release()
        if words[L.SEND_WAITING]:
            self._wake(L.SEND_WAITLIST_WORD, L.SEND_WAITING)
        kind, data = taken
        return data if kind == KIND_DATA else self._materialise(kind, data)

    def _note_receiver(self) -> None:
        """Who received last, and when, and this process's entry in the readers table: the
        monitor's "readers" (receive lock held; the C poll does the same)."""
        words = self.words
        now = time.monotonic_ns()
        words[L.LAST_RECV_PID] = _pid
        words[L.LAST_RECV_TIME] = now
        # The hint lives outside the instance: CPython 3.11 keeps an object's attributes in
        # their fast inline form only while there are few enough, and ChannelCore has 28
        # (measured: 30 made every send+recv about 100 ns slower; test_channel guards it).
        channel_id = self.channel_id
        _reader_hints[channel_id] = L.note_reader(words, _pid, now, _reader_hints.get(channel_id, -1))

    def forget_receiver(self, waker: _waker.Waker) -> None:
        self._waitlist_remove(L.RECV_WAITLIST_WORD, L.RECV_WAITING, waker)

    def take(self, timeout: float | None) -> bytes | memoryview:
        """Blocking receive of one encoded value. Raises ChannelClosed or TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        data = self.poll_fast(deadline)
        if data is not None:
            self._taken_since_empty += 1
            return data
        if timeout is not None and timeout <= 0:
            raise TimeoutError(f"shmfeed: nothing to receive on channel {self.channel_id:016x}; poll again later, or "
                               f"give a timeout to wait")
        if self._should_yield():
            # Let a sender that shares our CPU produce before we sleep: a sleep/wake pair
            # per message costs both sides far more than a yield (see _should_yield).
            self._yield()
            data = self.poll_fast(deadline)
            if data is not None:
                self._taken_since_empty = 1
                return data
        fast = self._fast
        if fast is not None and SPIN_MAX_NS and _spare_cpu.spare():
            data = self._spin(fast, deadline)
            if data is not None:
                return data
        waker = _waker.current_waker(self.namespace)
        slept = False  # the values found after a sleep tell _should_yield something
        try:
            while True:
                data = self.poll(waker, deadline)
                if data is not None:
                    self._taken_since_empty = 1
                    self._yield_state[1] = slept
                    return data
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"shmfeed: nothing received on channel {self.channel_id:016x} in {timeout} s; "
                        f"wait longer (timeout=None waits for ever), or check that something sends to it"
                    )
                woken = waker.wait(remaining)
                slept = True
                if woken and fast is not None:
                    # Woken by a send (which emptied the wait list): the C path first.
                    data = fast.poll(_pid)
                    if data is not None and data is not False:
                        if self.words[L.SEND_WAITING]:
                            self._wake(L.SEND_WAITLIST_WORD, L.SEND_WAITING)
                        self._taken_since_empty = 1
                        self._yield_state[1] = True
                        return data
        finally:
            self.forget_receiver(waker)
            waker.drain()

    def close(self) -> None:
        """Close the channel for every process and wake everyone waiting on it."""
        self.acquire()  # the send lock: no send commits after CLOSED is set
        try:
            self.words[L.CLOSED] = 1
        finally:
            self.release_lock()
        self._wake(L.RECV_WAITLIST_WORD, L.RECV_WAITING)
        self._wake(L.SEND_WAITLIST_WORD, L.SEND_WAITING)

    def wake_senders(self) -> None:
        """Wake every sender waiting for space (their subscription may have ended, or a
        receive made room: ``Ring.take_one`` calls it when some wait)."""
        self._wake(L.SEND_WAITLIST_WORD, L.SEND_WAITING)

    # --- figures (no lock: a torn read only misreports a counter) -----------------------

    def pending(self) -> int:
        words = self.words
        return max(0, int(words[L.SENT] - words[L.RECEIVED]))

    @property
    def closed(self) -> bool:
        return bool(self.words[L.CLOSED])


_cores: "weakref.WeakValueDictionary[tuple[str, int], ChannelCore]" = weakref.WeakValueDictionary()

# Whether this process has an active feed subscription of a channel (namespace, id); set by
# _feed, which the ring may not import.
subscribed_here: Callable[[str, int], bool] = lambda namespace, channel_id: False


def _register_core(core: ChannelCore) -> None:
    _cores[(core.namespace, core.channel_id)] = core


def release_namespace(namespace: str | None = None) -> None:
    """Detach this process from its channels (of one namespace, or all)."""
    for core in list(_cores.values()):
        if namespace is None or core.namespace == namespace:
            core.release()


def _after_fork() -> None:
    _refresh_pid()
    for core in list(_cores.values()):
        core.reattach_after_fork()


_process.on_exit(release_namespace)
def _before_fork() -> None:
    for core in list(_cores.values()):
        core.reserve_for_child()


_process.before_fork(_before_fork)
_process.on_fork_child(_after_fork)
