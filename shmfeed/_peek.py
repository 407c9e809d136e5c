"""Reading a channel without taking: how a durable bridge reads its outbox (``_outbox``).

A ``Cursor`` reads the committed records after a position of its own, starting from the
channel's read position; nothing changes in the ring until ``commit``, which takes every
record before a position the cursor reached (RECEIVED and READ_POS advance, the links of
spilled values are removed). A durable bridge commits a value only once JetStream has
acknowledged it: if the bridge is killed first, its successor reads the value again.

Each value is known by its *index*: the number of records the channel had taken before it
(RECEIVED at the read position, plus its place after it). Only the reader moves RECEIVED,
so the index of a value stays the same for every reader that ever reads it: a bridge's
successor gives the values it publishes again the same message ids.

The reader is the channel's one receiver; the record format is ``_ring``'s. Senders only
append after WRITE_POS, and a ``drop_newest`` ring never moves READ_POS on its own, so the
records between READ_POS and WRITE_POS stay as they are while the cursor reads them (it
holds the receive lock all the same, as every receive does: a reader killed inside is
released by recovery).
"""

from __future__ import annotations

import time
from typing import NamedTuple

from . import _layout as L
from . import _names, _ring, _spill, _waker
from ._errors import ChannelClosed, ChannelCorruptError


class Peeked(NamedTuple):
    """One value read and not taken: its index, the position after its record, its bytes."""

    number: int
    end: int
    data: bytes


class Cursor:
    """Reads ``core`` without taking (one thread)."""

    def __init__(self, core: _ring.ChannelCore) -> None:
        self.core = core
        self.position, self.index = self._read_position()
        self.stopping = False
        self._waiting: _waker.Waker | None = None  # the reader's waker while it waits

    def stop(self) -> None:
        """Make ``read`` return what is there without waiting (another thread)."""
        self.stopping = True
        waiting = self._waiting
        if waiting is not None:
            waiting.post()

    def _read_position(self) -> tuple[int, int]:
        core = self.core
        with _receive_lock(core):
            return int(core.words[L.READ_POS]), int(core.words[L.RECEIVED])

    def rewind(self) -> None:
        """Read again from the channel's read position (what is not committed)."""
        self.position, self.index = self._read_position()

    def read(self, limit: int, timeout: float | None = None) -> list[Peeked]:
        """Up to ``limit`` values after the cursor, waiting for one if there is none
        (none: ``stop`` was called).

        Raises:
            ChannelClosed: the channel is closed and nothing after the cursor is left.
            ChannelCorruptError: the ring held bytes that are not records; what it held
                was discarded and the cursor rewound.
            TimeoutError: nothing came within ``timeout`` seconds.
        """
        core = self.core
        deadline = None if timeout is None else time.monotonic() + timeout
        found = self._peek(limit)
        if found or self.stopping:
            return found
        waker = self._waiting = _waker.current_waker(core.namespace)
        try:
            while True:
                core._waitlist_add(L.RECV_WAITLIST_WORD, L.RECV_WAITING, waker, deadline)
                closed = core.words[L.CLOSED]  # read before the ring: what came before close is read
                found = self._peek(limit)
                if found or self.stopping:
                    return found
                if closed:
                    raise ChannelClosed(f"shmfeed: channel {core.channel_id:016x} is closed; {_ring.CLOSED_FIX}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"shmfeed: nothing new on channel {core.channel_id:016x} in {timeout} s; "
                                       f"wait longer, or check that something sends to it")
                waker.wait(remaining)
        finally:
            self._waiting = None
            core.forget_receiver(waker)
            waker.drain()

    def _peek(self, limit: int) -> list[Peeked]:
        core = self.core
        words, ring, base, buffer = core.words, core.ring_bytes, L.HEADER_BYTES, core.buffer
        found: list[tuple[int, int, int, bytes]] = []
        with _receive_lock(core):
            position, index = self.position, self.index
            read_pos = int(words[L.READ_POS])
            end = int(words[L.WRITE_POS])
            if not read_pos <= position <= end:  # taken by someone else, or a rewound header
                raise self._corrupt(f"the reader's position {position} is outside {read_pos}-{end}")
            while position < end and len(found) < limit:
                available = end - position
                offset = position % ring
                if offset & 7 or available > ring:
                    raise self._corrupt(f"a position {position} that is not a record's")
                size, kind = _ring.RECORD_HEADER.unpack_from(buffer, base + offset)
                if kind == _ring.KIND_WRAP and available > ring - offset:
                    position += ring - offset
                    continue
                record = 8 + ((size + 7) & ~7)
                if kind not in (_ring.KIND_DATA, _ring.KIND_SPILL) or offset + record > ring or record > available:
                    raise self._corrupt(f"bytes at ring offset {offset} (kind {kind}, length {size})")
                start = base + offset + 8
                position += record
                found.append((index, position, kind, buffer[start:start + size].tobytes()))
                index += 1
        self.position, self.index = position, index
        return [Peeked(index, end, self._value(kind, data)) for index, end, kind, data in found]

    def _value(self, kind: int, data: bytes) -> bytes:
        if kind == _ring.KIND_DATA:
            return data
        core = self.core
        if len(data) != _ring.SPILL_REFERENCE.size:
            raise ChannelCorruptError(f"shmfeed: channel {core.channel_id:016x}: bad spill record; {_ring.CORRUPT_RECORD_FIX}")
        spill_id, size = _ring.SPILL_REFERENCE.unpack(data)
        try:
            return _spill.read_kept(_names.spill_file(core.namespace, core.channel_id, spill_id), size)
        except (OSError, ValueError) as error:
            raise ChannelCorruptError(
                f"shmfeed: channel {core.channel_id:016x}: a large value's file is missing or not valid ({error}); "
                f"{_ring.CORRUPT_RECORD_FIX}"
            ) from error

    def _corrupt(self, what: str) -> ChannelCorruptError:
        """Discard what the ring holds (receive lock held) and start again after it."""
        core = self.core
        core._discard_corrupt_locked()
        self.position, self.index = int(core.words[L.READ_POS]), int(core.words[L.RECEIVED])
        return ChannelCorruptError(f"shmfeed: channel {core.channel_id:016x} holds {what}; "
                                   f"its waiting messages were discarded")

    def commit(self, position: int) -> int:
        """Take every record before ``position`` (the end of a value the cursor read); how
        many. Any thread: the reader goes on meanwhile."""
        core = self.core
        words, ring, base, buffer = core.words, core.ring_bytes, L.HEADER_BYTES, core.buffer
        spilled: list[bytes] = []
        taken = 0
        with _receive_lock(core):
            read_pos = int(words[L.READ_POS])
            if not read_pos < position <= int(words[L.WRITE_POS]):
                return 0  # committed before (or discarded as corrupt meanwhile)
            at = read_pos
            while at < position:
                offset = at % ring
                size, kind = _ring.RECORD_HEADER.unpack_from(buffer, base + offset)
                if kind == _ring.KIND_WRAP and position - at > ring - offset:
                    at += ring - offset
                    continue
                if kind == _ring.KIND_SPILL:
                    spilled.append(buffer[base + offset + 8:base + offset + 8 + size].tobytes())
                at += 8 + ((size + 7) & ~7)
                taken += 1
            words[L.RECEIVED] += taken
            words[L.READ_POS] = position
            core._note_receiver()
        for record in spilled:  # after READ_POS: killed between, a link is left for the channel's end to remove
            if len(record) == _ring.SPILL_REFERENCE.size:
                core._unlink_spill_record(record)
        return taken


class _receive_lock:
    """The channel's receive lock, its owner word set (as ``ChannelCore.poll`` does)."""

    def __init__(self, core: _ring.ChannelCore) -> None:
        self.core = core

    def __enter__(self) -> None:
        core = self.core
        core.recv_lock.acquire()
        core.words[L.RECV_LOCK_OWNER] = _ring._pid

    def __exit__(self, *exc_info: object) -> None:
        core = self.core
        core.words[L.RECV_LOCK_OWNER] = 0
        core.recv_lock.release()
