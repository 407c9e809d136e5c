"""The shared-memory layouts, written down once, and the helpers common to all segments.

Every segment starts with a 4096-byte header of little-endian 64-bit words (accessed as a
``memoryview`` cast to ``'Q'``) and byte areas. All fields are read and written only under
the segment's lock (a named semaphore whose name derives from ``LOCK_ID``), except the
counters the monitor reads without the lock (a torn read there only misreports a figure).

Common part (words 0-7 and the attach slots), the same in every segment:

| word | name          | written by                       | meaning                                   |
|------|---------------|----------------------------------|-------------------------------------------|
| 0    | MAGIC         | creator, before publishing       | kind and layout version                   |
| 1    | HEADER_BYTES  | creator                          | offset of the payload area (4096)         |
| 2    | LOCK_ID       | creator                          | names the lock semaphore                  |
| 3    | LOCK_OWNER    | lock holder, right after acquire | pid holding the lock, 0 if none           |
| 4    | DESTROYED     | last detacher                    | 1 once the names are unlinked             |
| 5    | CREATOR_PID   | creator                          | for the monitor                           |
| 6    | CREATOR_TICKS | creator                          | creator's start time (clock ticks)        |
| 7    | ATTACHED      | attach/detach                    | how many attach slots are in use          |

Bytes 512-2559: 128 attach slots of (pid | flags << 32, start_ticks): the processes using
the segment. The high half of a slot's first word holds that process's flags (``SLOT_SENDER``:
it sends on this feed; ``SLOT_HOLDER``: it holds a ``Channel`` object of this channel); only
the owner of a slot writes its flags while it lives, with one aligned 8-byte store, so no
lock is needed for that (and a SIGTERM handler may clear them). The last process to detach (the others being gone or dead) unlinks the segment and its
semaphores, so nothing stays in ``/dev/shm`` after normal exits; the registry and
``shmfeed gc`` use the same slots to clean up after processes that were killed.

Channel segment (``MAGIC = CHANNEL_MAGIC``), words 8-31, one cache line (8 words) per
group: what every send writes (8-15), what both sides read and seldom change (16-23), what
every receive writes (24-31). When the sender's and the receivers' positions shared a line,
each store took the line from the other core, at every value (a small value's fan-out to
one receiver ran 1.5x faster once apart).

| word | name          | meaning                                                  |
|------|---------------|----------------------------------------------------------|
| 8    | WRITE_POS     | bytes ever written (monotonic; offset = pos % RING_BYTES) |
| 9    | SENT          | messages ever committed                                  |
| 10   | DROPPED       | messages dropped by the overflow policy                  |
| 11   | EVICTED       | evictions (overflow="evict")                             |
| 12   | SPILLED       | values that travelled in a spill file                    |
| 13   | ELEM_TYPE_LEN | length of the element type name at bytes 256-511         |
| 14   | CHANNEL_FLAGS | bit 0: a subscription's error channel (hidden by the monitor); bit 1: a durable bridge's outbox (``_outbox``) |
| 15   | CHANNEL_NAME_LEN | length of the channel's label at bytes 3584-3711 (0: none) |
| 16   | RING_BYTES    | size of the ring (payload area), a multiple of 8         |
| 17   | CAPACITY      | most messages the ring holds                             |
| 18   | CLOSED        | 1 once closed                                            |
| 19   | RECV_WAITING  | receivers in the receive wait list                       |
| 20   | SEND_WAITING  | senders in the send wait list                            |
| 21   | OVERFLOW      | overflow policy code                                     |
| 22   | RECV_LOCK_ID  | names the receive lock (LOCK_ID is the send lock)        |
| 23   | WAIT_LOCK_ID  | names the lock of the two wait lists                     |
| 24   | READ_POS      | bytes ever consumed                                      |
| 25   | RECEIVED      | messages ever taken                                      |
| 26   | RECV_LOCK_OWNER | pid holding the receive lock                           |
| 27   | LAST_RECV_PID | pid of the last process that received (for the monitor)  |
| 28   | LAST_RECV_TIME | CLOCK_MONOTONIC ns of the last receive (for the monitor) |
| 29   | DISCARDED     | messages discarded because the ring was found corrupt    |
| 30   | WAIT_LOCK_OWNER | pid holding the wait-list lock                         |
| 31   | IN_FLIGHT     | pickled or encoded references not yet unpickled (see below) |

A channel that no live process holds (no ``SLOT_HOLDER`` flag) and that no reference in
flight (IN_FLIGHT) may still reach is closed by the process that dropped the last
``Channel`` object: nobody can ever read it again.

A channel has three locks, always taken in the order send, receive, wait-list: senders
hold the send lock (which also guards the attach slots and CLOSED), receivers the receive
lock, and both only briefly the wait-list lock. Senders write WRITE_POS, SENT,
DROPPED, SPILLED; receivers write READ_POS, RECEIVED, DISCARDED. Each side reads the
other's positions without its lock, which is sound on x86-64 (aligned 8-byte stores are
atomic and stay in program order; the semaphore operations are full barriers); elsewhere
receivers take the send lock too (``_ring.SINGLE_LOCK``).

Bytes 2560-3071: receive wait list, 64 waker ids (0 = free). Bytes 3072-3583: send wait
list, 64 waker ids. Bytes 3584-3711: the channel's label (``Channel(name=...)``, UTF-8,
written by the creator before publishing, never changed). Bytes 3712-4095: the readers
table, ``READER_SLOTS`` (24) entries of (pid, CLOCK_MONOTONIC ns of its last receive):
the processes that received from the channel, for the monitor. A receiver writes its own
entry under the receive lock at every receive (``note_reader``; the C poll does the same),
taking a free entry, else the one read longest ago; nothing else writes it, so a reader
that exits or dies keeps its entry until another one needs the room. The ring starts at
byte 4096; its record format is in ``_ring``.

Feed segment (``MAGIC = FEED_MAGIC``), words 8-31:

| word | name            | meaning                                                  |
|------|-----------------|----------------------------------------------------------|
| 8    | FEED_CLOSED     | 1 once ``close()`` was called                            |
| 9    | SEND_LOCK_ID    | names the send lock (serializes sends feed-wide)         |
| 10   | SEND_LOCK_OWNER | pid holding the send lock                                |
| 11   | SUB_VERSION     | bumped on every change of the subscription table         |
| 12   | SUB_ACTIVE      | active subscriptions                                     |
| 13   | SENDS           | values sent                                              |
| 14   | TABLE_HIGH      | one past the highest table entry ever used               |
| 15   | FEED_TYPE_LEN   | length of the element type name at bytes 256-511         |
| 16   | NAME_LEN        | length of the feed's name at bytes 2560-2815             |
| 17   | NEXT_SUB_ID     | last subscription id handed out                          |
| 18   | DELIVERED       | deliveries to channels                                   |
| 19   | LAST_SENDER_PID | pid of the last process that sent                        |
| 20   | SENDER_DEATHS   | senders that died without detaching, not yet reported    |

The senders of a feed are the attach slots flagged ``SLOT_SENDER`` (set by a process at its
first send, cleared when it detaches normally; a bridge's injections do not set it, see
``FeedCore.send``). The registry fails the subscriptions with
``SenderDiedError`` once no live sender is left and one of them died (a flagged slot of a
dead process, or SENDER_DEATHS, counted when recovery cleared such a slot while other
senders lived on).

Bytes 2816-3903 of a feed's header hold the delivery marks of durable bridges (layout and
rules in ``_marks``, their one owner), written under the send lock. Bytes 3904-3967 name
the durable bridges' outboxes (``_outbox``, their one owner): channels flagged
``FLAG_OUTBOX`` that outlive their holders while a live feed names them.

The subscription table starts at byte 4096: ``FEED_TABLE_SLOTS`` entries of 4 words
(``SUB_ID``, ``CHANNEL_ID``, ``ERR_CHANNEL_ID``, ``STATE | OWNER_PID << 32``).
The table is changed under the segment lock; the send lock is held for a whole send.

Scope segment (``MAGIC = SCOPE_MAGIC``, a named ``SubscriptionScope``), words 8-10:
SCOPE_CLOSED, SCOPE_COUNT (tracked subscriptions of all processes), SCOPE_NAME_LEN (name at
bytes 2560-2815). Bytes 3072-3583: the wait list of the processes' scope watchers (64
waker ids). The entry table starts at byte 4096: ``SCOPE_SLOTS`` entries of 4 words
(pid, start_ticks, local id, 1 if in use), one per tracked subscription.

The three kinds, with their magic, smallest size and lock words, are described once more as
data (``SEGMENT_KINDS``): opening, unlinking, ``shmfeed gc`` and recovery walk a segment's
locks through it, whatever its kind.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

from . import _process, _waker
from ._errors import TableFullError

PAGE = 4096
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
HEADER_BYTES = PAGE

CHANNEL_MAGIC = int.from_bytes(b"SFCHAN02", "little")
FEED_MAGIC = int.from_bytes(b"SFFEED01", "little")
SCOPE_MAGIC = int.from_bytes(b"SFSCOP01", "little")

# Common words.
MAGIC, HEADER_BYTES_WORD, LOCK_ID, LOCK_OWNER, DESTROYED, CREATOR_PID, CREATOR_TICKS, ATTACHED = range(8)

# Channel words: a cache line for what sends write, one for what both read, one for what
# receives write (see the docstring).
(
    WRITE_POS,
    SENT,
    DROPPED,
    EVICTED,
    SPILLED,
    ELEM_TYPE_LEN,
    CHANNEL_FLAGS,
    CHANNEL_NAME_LEN,
    RING_BYTES,
    CAPACITY,
    CLOSED,
    RECV_WAITING,
    SEND_WAITING,
    OVERFLOW,
    RECV_LOCK_ID,
    WAIT_LOCK_ID,
    READ_POS,
    RECEIVED,
    RECV_LOCK_OWNER,
    LAST_RECV_PID,
    LAST_RECV_TIME,
    DISCARDED,
    WAIT_LOCK_OWNER,
    IN_FLIGHT,
) = range(8, 32)

FLAG_ERROR_CHANNEL = 1
FLAG_OUTBOX = 2  # a durable bridge's outbox: kept while a live feed names it (_outbox)

# Feed words.
(
    FEED_CLOSED,
    SEND_LOCK_ID,
    SEND_LOCK_OWNER,
    SUB_VERSION,
    SUB_ACTIVE,
    SENDS,
    TABLE_HIGH,
    FEED_TYPE_LEN,
    NAME_LEN,
    NEXT_SUB_ID,
    DELIVERED,
    LAST_SENDER_PID,
    SENDER_DEATHS,
) = range(8, 21)

# Scope words.
SCOPE_CLOSED, SCOPE_COUNT, SCOPE_NAME_LEN, SCOPE_WAITING = 8, 9, 10, 11
SCOPE_WAITLIST_WORD = 3072 // 8
SCOPE_SLOTS = 1024
SCOPE_ENTRY_WORDS = 4
SCOPE_SEGMENT_BYTES = 4096 + SCOPE_SLOTS * SCOPE_ENTRY_WORDS * 8

TYPE_NAME_OFFSET = 256
TYPE_NAME_MAX = 256
FEED_NAME_OFFSET = 2560
FEED_NAME_MAX = 256
CHANNEL_NAME_OFFSET = 3584
CHANNEL_NAME_MAX = 128
READERS_FIRST_WORD = 3712 // 8
READER_SLOTS = 24
READERS_LAST_WORD = READERS_FIRST_WORD + 2 * READER_SLOTS - 1  # the header's last word

ATTACH_FIRST_WORD = 512 // 8
ATTACH_SLOTS = 128
RECV_WAITLIST_WORD = 2560 // 8
SEND_WAITLIST_WORD = 3072 // 8
WAITLIST_SLOTS = 64

# Flags in the high half of an attach slot's first word (see the docstring).
SLOT_PID_MASK = 0xFFFF_FFFF
SLOT_SENDER = 1 << 32  # feeds: this process has sent
SLOT_HOLDER = 1 << 33  # channels: this process holds a Channel object of it

FEED_TABLE_SLOTS = 4096
FEED_ENTRY_WORDS = 4
FEED_SEGMENT_BYTES = HEADER_BYTES + FEED_TABLE_SLOTS * FEED_ENTRY_WORDS * 8

# Subscription entry states (low 32 bits of the entry's fourth word).
SUB_FREE, SUB_ACTIVE_STATE = 0, 1

MIN_RING_BYTES = PAGE


class LockWord(NamedTuple):
    """One lock of a segment: the word naming its semaphore, the word its holder's pid is in."""

    id_word: int
    owner_word: int
    what: str  # for reports: "send", "receive", ...


class SegmentKind(NamedTuple):
    """A kind of segment: how to tell it, its smallest size, its locks (in lock order)."""

    name: str
    magic: int
    min_bytes: int
    locks: tuple[LockWord, ...]


CHANNEL_KIND = SegmentKind("channel", CHANNEL_MAGIC, HEADER_BYTES + MIN_RING_BYTES, (
    LockWord(LOCK_ID, LOCK_OWNER, "send"),  # also guards the attach slots and CLOSED
    LockWord(RECV_LOCK_ID, RECV_LOCK_OWNER, "receive"),
    LockWord(WAIT_LOCK_ID, WAIT_LOCK_OWNER, "wait-list"),
))
FEED_KIND = SegmentKind("feed", FEED_MAGIC, FEED_SEGMENT_BYTES, (
    LockWord(SEND_LOCK_ID, SEND_LOCK_OWNER, "send"),  # held for a whole send
    LockWord(LOCK_ID, LOCK_OWNER, "table"),  # the subscription table and attach slots
))
SCOPE_KIND = SegmentKind("scope", SCOPE_MAGIC, SCOPE_SEGMENT_BYTES, (LockWord(LOCK_ID, LOCK_OWNER, "table"),))
SEGMENT_KINDS = {kind.magic: kind for kind in (CHANNEL_KIND, FEED_KIND, SCOPE_KIND)}


def segment_kind(words: memoryview, size: int) -> SegmentKind | None:
    """The kind of a mapped segment by its magic; None if unknown or too small for its kind."""
    kind = SEGMENT_KINDS.get(int(words[MAGIC]))
    return kind if kind is not None and size >= kind.min_bytes else None


def header_problem(words: memoryview, size: int, kind: SegmentKind) -> str | None:
    """What makes a mapped segment of ``size`` bytes unusable as a ``kind`` (None: nothing):
    checked where any segment is opened, before any offset is computed from its words.

    For a channel that is the ring's geometry too: a ring of 0 bytes, or one that does not
    fit the mapping, would make every send and receive fail (or read out of bounds).
    """
    if size < kind.min_bytes:
        return f"{size} bytes, less than a {kind.name} takes"
    if words[MAGIC] != kind.magic or words[HEADER_BYTES_WORD] != HEADER_BYTES:
        return f"not a {kind.name} header"
    if kind is CHANNEL_KIND:
        ring = int(words[RING_BYTES])
        if ring < MIN_RING_BYTES or ring % 8 or HEADER_BYTES + ring > size:
            return f"a ring of {ring} bytes in a segment of {size}"
        if not words[CAPACITY]:
            return "a capacity of 0"
    return None


def lock_ids(words: memoryview, kind: SegmentKind) -> list[int]:
    """The ids of the lock semaphores a segment names, in its kind's lock order."""
    return [int(words[lock.id_word]) for lock in kind.locks]


def table_high(words: memoryview) -> int:
    """A feed's TABLE_HIGH, clamped to the table: shared memory is never trusted."""
    return min(int(words[TABLE_HIGH]), FEED_TABLE_SLOTS)


class TableEntry(NamedTuple):
    """One active subscription in a feed's table (``active_subscriptions``)."""

    entry: int
    sub_id: int
    channel_id: int
    err_channel_id: int
    owner_pid: int


def active_subscriptions(words: memoryview, table: memoryview) -> list[TableEntry]:
    """The active entries of a feed's subscription table: the one walk of it.

    Read under the feed lock for a consistent view; without it a torn read may only
    misname a channel (the monitor, a timeout's message).
    """
    found = []
    for index in range(table_high(words)):
        word = index * FEED_ENTRY_WORDS
        state = int(table[word + 3])
        if state & 0xFFFF_FFFF == SUB_ACTIVE_STATE:
            found.append(TableEntry(index, int(table[word]), int(table[word + 1]), int(table[word + 2]), state >> 32))
    return found


def note_reader(words: memoryview, pid: int, now_ns: int, hint: int) -> int:
    """Record a receive by ``pid`` at ``now_ns`` in the readers table (receive lock held).

    ``hint`` is the entry this process used last (-1: none); returns the entry used, the
    next call's hint. Its own entry, else a free one, else the one read longest ago. The
    time is stored before the pid, so an unlocked reader (the monitor) never pairs a new
    pid with an old entry's time.
    """
    if 0 <= hint < READER_SLOTS and words[READERS_FIRST_WORD + 2 * hint] == pid:
        words[READERS_FIRST_WORD + 2 * hint + 1] = now_ns
        return hint
    choice, oldest = 0, U64_MAX + 1
    for entry in range(READER_SLOTS):
        word = READERS_FIRST_WORD + 2 * entry
        owner = words[word]
        if owner == pid:
            choice = entry
            break
        stamp = 0 if owner == 0 else int(words[word + 1]) + 1  # a free entry before any used one
        if stamp < oldest:
            choice, oldest = entry, stamp
    word = READERS_FIRST_WORD + 2 * choice
    words[word + 1] = now_ns
    words[word] = pid
    return choice


def readers(words: memoryview) -> list[tuple[int, int]]:
    """The readers table: ``(pid, last receive in CLOCK_MONOTONIC ns)``, latest first."""
    found = []
    for word in range(READERS_FIRST_WORD, READERS_LAST_WORD, 2):
        pid = int(words[word]) & SLOT_PID_MASK
        if pid:
            found.append((pid, int(words[word + 1])))
    return sorted(found, key=lambda reader: -reader[1])


def write_text(buffer: memoryview, offset: int, limit: int, text: str) -> int:
    """Store ``text`` (UTF-8, truncated to ``limit`` bytes) and return its length."""
    data = text.encode("utf-8", "replace")[:limit]
    buffer[offset : offset + len(data)] = data
    return len(data)


def read_text(buffer: memoryview, offset: int, length: int, limit: int) -> str:
    length = max(0, min(length, limit))
    return bytes(buffer[offset : offset + length]).decode("utf-8", "replace")


def init_common(words: memoryview, magic: int, lock_id: int) -> None:
    """Fill the common words of a new segment (before it is published), the creator in its
    attach slots."""
    pid, ticks = _process.identity()
    words[MAGIC] = magic
    words[HEADER_BYTES_WORD] = HEADER_BYTES
    words[LOCK_ID] = lock_id
    words[CREATOR_PID] = pid
    words[CREATOR_TICKS] = ticks
    if not attach(words):  # a new segment's slots are all free: never, but never ignored either
        raise TableFullError(table_full_message("a new segment"))




def _slot_words() -> range:
    return range(ATTACH_FIRST_WORD, ATTACH_FIRST_WORD + 2 * ATTACH_SLOTS, 2)


def slot_pid(first_word_value: int) -> int:
    """The pid in an attach slot's first word (its high half holds flags)."""
    return int(first_word_value) & SLOT_PID_MASK


def reserve_for_child(words: memoryview) -> None:
    """Before fork: hold a slot for the child (lock held).

    The parent may drop the object right after forking, before the child has run at all;
    without this, it could unlink an object the child is about to use. A full table is
    left to the child, whose ``claim_after_fork`` then refuses. The slot carries our
    ``SLOT_HOLDER`` flag: the child inherits our Channel objects.
    """
    own = own_slot(words)
    flags = int(words[own]) & SLOT_HOLDER if own >= 0 else 0
    free = _free_slot(words)
    if free >= 0:
        words[free] = _process.identity()[0] | flags
        words[free + 1] = _process.fork_reservation()
        words[ATTACHED] += 1


def claim_after_fork(words: memoryview) -> bool:
    """In the child: take over a slot the parent reserved, or attach (lock held).

    False if the attach slots are full.
    """
    parent = os.getppid()
    pid, ticks = _process.identity()
    for word in _slot_words():
        if words[word] & SLOT_PID_MASK == parent and _process.is_fork_reservation(words[word + 1]):
            words[word] = pid
            words[word + 1] = ticks
            return True
    return attach(words)


def _free_slot(words: memoryview) -> int:
    for word in _slot_words():
        if words[word] == 0:
            return word
    return _reclaim_dead_slot(words)


def attach(words: memoryview) -> bool:
    """Record this process in the attach slots (lock held). False if the table is full."""
    pid, ticks = _process.identity()
    free = -1
    for word in _slot_words():
        value = words[word]
        if value & SLOT_PID_MASK == pid and words[word + 1] == ticks:
            return True
        if free < 0 and value == 0:
            free = word
    if free < 0:
        free = _reclaim_dead_slot(words)
        if free < 0:
            return False
    words[free] = pid
    words[free + 1] = ticks
    words[ATTACHED] += 1
    return True


def table_full_message(what: str) -> str:
    return (
        f"shmfeed: {what} is used by {ATTACH_SLOTS} processes, the most one object can be "
        f"(its attach slots); let some of them close it or exit first"
    )


def slot_alive(pid: int, ticks: int, is_alive: Callable[[int, int], bool] = _process.is_alive) -> bool:
    """Whether the process recorded as ``(pid, start_ticks)`` (an attach slot, a scope entry)
    is alive, by ``is_alive``.

    A start time of 0 names no process: ``_process.matches`` reads 0 as "unknown, any", so
    a slot of ``(1, 0)`` (written by a bug or a hostile process) would live as long as pid 1
    and never be collected. Every process records its real start time.
    """
    return ticks != 0 and is_alive(pid, ticks)


def _reclaim_dead_slot(words: memoryview) -> int:
    """A dead process's slot, cleared for reuse; -1 if none (lock held).

    A dead sender's slot is left to recovery, which must see that a sender died.
    """
    for word in _slot_words():
        value = words[word]
        if not value & SLOT_SENDER and not slot_alive(slot_pid(value), int(words[word + 1])):
            words[word] = words[word + 1] = 0
            words[ATTACHED] -= 1
            return word
    return -1


def detach(words: memoryview, is_alive: Callable[[int, int], bool] = _process.is_alive) -> bool:
    """Remove this process from the attach slots (lock held).

    Returns True if no live process remains attached: the caller then destroys the segment.
    """
    pid, ticks = _process.identity()
    others_alive = False
    own_reservations: list[int] = []
    for word in _slot_words():
        value = words[word]
        if value == 0:
            continue
        if value & SLOT_PID_MASK == pid and words[word + 1] == ticks:
            words[word] = words[word + 1] = 0
            words[ATTACHED] -= 1
        elif value & SLOT_PID_MASK == pid and _process.is_fork_reservation(words[word + 1]):
            own_reservations.append(_process.reserved_at(words[word + 1]))  # see below
        elif not others_alive:
            others_alive = slot_alive(slot_pid(value), int(words[word + 1]), is_alive)
    if own_reservations and not others_alive:
        # Ours, for a child forked since: alive while such a child may still claim it.
        known = {p for p, _ in attached_processes(words)}
        others_alive = _process.has_unknown_child(known, min(own_reservations))
    return not others_alive


def attached_processes(words: memoryview, flag: int = 0) -> list[tuple[int, int]]:
    """The ``(pid, start_ticks)`` pairs in the attach slots (only those flagged ``flag``)."""
    result = []
    for word in _slot_words():
        value = int(words[word])
        if value and (not flag or value & flag):
            result.append((value & SLOT_PID_MASK, int(words[word + 1])))
    return result


def remove_attached(words: memoryview, pid: int, ticks: int) -> int:
    """Clear the attach slot of ``(pid, ticks)`` (lock held); returns its flags, -1 if absent."""
    for word in _slot_words():
        value = int(words[word])
        if value and value & SLOT_PID_MASK == pid and words[word + 1] == ticks:
            words[word] = words[word + 1] = 0
            words[ATTACHED] -= 1
            return value & ~SLOT_PID_MASK
    return -1


def own_slot(words: memoryview) -> int:
    """This process's attach slot (its first word), or -1. No lock: only we change it."""
    pid, ticks = _process.identity()
    for word in _slot_words():
        if words[word] & SLOT_PID_MASK == pid and words[word + 1] == ticks:
            return word
    return -1


def set_own_flag(words: memoryview, flag: int, on: bool) -> bool:
    """Set or clear a flag of this process's slot (no lock: see the docstring); False if
    this process is not attached."""
    word = own_slot(words)
    if word < 0:
        return False
    value = int(words[word])
    words[word] = value | flag if on else value & ~flag
    return True


def waitlist_add(words: memoryview, first_word: int, count_word: int, waker_id: int) -> bool:
    """Put ``waker_id`` in a wait list (lock held). False if the list is full."""
    for word in range(first_word, first_word + WAITLIST_SLOTS):
        if words[word] == 0:
            words[word] = waker_id
            words[count_word] += 1
            return True
    return False


def waitlist_remove(words: memoryview, first_word: int, count_word: int, waker_id: int) -> None:
    """Take ``waker_id`` out of a wait list if a waker did not already (lock held)."""
    if words[count_word] == 0:
        return
    for word in range(first_word, first_word + WAITLIST_SLOTS):
        if words[word] == waker_id:
            words[word] = 0
            words[count_word] -= 1
            return


def waitlist_post_all(words: memoryview, first_word: int, count_word: int, namespace: str) -> None:
    """Post every waker of a wait list, then empty it (wait-list lock held)."""
    remaining = words[count_word]
    word = first_word
    end = first_word + WAITLIST_SLOTS
    while remaining and word < end:
        waker_id = words[word]
        if waker_id:
            _waker.post(namespace, int(waker_id))
            remaining -= 1
        word += 1
    waitlist_take_all(words, first_word, count_word)


def waitlist_take_all(words: memoryview, first_word: int, count_word: int) -> list[int]:
    """Empty a wait list and return the waker ids to post (lock held)."""
    taken = []
    remaining = words[count_word]
    word = first_word
    end = first_word + WAITLIST_SLOTS
    while remaining and word < end:
        waker_id = words[word]
        if waker_id:
            taken.append(waker_id)
            words[word] = 0
            remaining -= 1
        word += 1
    words[count_word] = 0
    return taken

