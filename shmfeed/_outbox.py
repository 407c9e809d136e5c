"""Outboxes: the channel a durable bridge reads a feed from, kept when the bridge is killed
(SPEC §7: nothing lost across a bridge killed with SIGKILL and started again).

A durable bridge subscribes to each feed it carries with a channel of its own, its
*outbox*, made with ``_layout.FLAG_OUTBOX``. It reads the outbox without taking (``_peek``)
and takes what it read only once JetStream has acknowledged it. Were the outbox an ordinary
channel, a SIGKILL of the bridge would end its subscription and destroy its ring, and with
them the values sent meanwhile and those read but not yet stored. So the feed records its
outbox here, and while the feed lives and names it:

- recovery does not end the outbox's subscription when its owner dies
  (``kept_subscriptions``);
- the channel is not destroyed when its last holder leaves or dies (``is_kept``: the
  detach in ``_segment``, recovery, ``shmfeed gc``), so local sends go on filling it;
- the next durable bridge of the realm finds it (``find``), reads on from its read
  position, and takes its subscription over (``_bridge_outbox``).

Once the feed is gone (every process of it left or died), nothing names the outbox and it
goes as any orphaned channel.

Layout (this module owns it): ``ENTRIES`` entries of 4 words from byte ``FIRST_BYTE`` of a
feed's header (after the marks of ``_marks``): KEY (the realm's mark key, 0 = free),
CHANNEL_ID, SUB_ID and TABLE_ENTRY of the outbox's subscription. Written under the feed's
segment lock (with its send lock held: no send sees half a change); read by recovery and
gc without a lock (an entry is written whole before its KEY).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from . import _layout as L
from . import _marks, _names, _shm
from ._errors import TableFullError

FIRST_BYTE = _marks.FIRST_BYTE + _marks.ENTRIES * _marks.ENTRY_BYTES  # 3904
ENTRY_WORDS = 4
ENTRIES = _marks.ENTRIES  # one per realm, as the marks
KEY, CHANNEL_ID, SUB_ID, TABLE_ENTRY = range(ENTRY_WORDS)

assert FIRST_BYTE + ENTRIES * ENTRY_WORDS * 8 <= L.HEADER_BYTES


class Outbox(NamedTuple):
    """A feed's record of one realm's outbox."""

    channel_id: int
    sub_id: int
    table_entry: int


def _first_word(index: int) -> int:
    return FIRST_BYTE // 8 + index * ENTRY_WORDS


def find(words: memoryview, key: int) -> Outbox | None:
    """The outbox the feed records for the realm ``key``, if any."""
    for index in range(ENTRIES):
        first = _first_word(index)
        if words[first + KEY] == key:
            return Outbox(int(words[first + CHANNEL_ID]), int(words[first + SUB_ID]), int(words[first + TABLE_ENTRY]))
    return None


def record(words: memoryview, key: int, outbox: Outbox) -> None:
    """Record (or replace) the realm's outbox (feed segment lock held).

    Raises:
        TableFullError: ``ENTRIES`` other realms have an outbox on this feed.
    """
    free = None
    for index in range(ENTRIES):
        first = _first_word(index)
        if words[first + KEY] == key:
            free = first
            break
        if free is None and not words[first + KEY]:
            free = first
    if free is None:
        raise TableFullError(f"shmfeed: a feed keeps the outboxes of at most {ENTRIES} durable bridges' realms; "
                             f"bridge it durably in fewer realms")
    words[free + KEY] = 0  # the entry is never seen half written
    words[free + CHANNEL_ID], words[free + SUB_ID], words[free + TABLE_ENTRY] = outbox
    words[free + KEY] = key


def forget(words: memoryview, key: int) -> None:
    """The realm has no outbox on this feed any more (feed segment lock held)."""
    for index in range(ENTRIES):
        first = _first_word(index)
        if words[first + KEY] == key:
            words[first + KEY] = 0


def kept_subscriptions(words: memoryview) -> set[int]:
    """The subscription ids of the outboxes a feed records: recovery does not end them
    when their owner (a killed bridge) is dead."""
    kept = set()
    for index in range(ENTRIES):
        first = _first_word(index)
        if words[first + KEY]:
            kept.add(int(words[first + SUB_ID]))
    return kept


def named_channels(namespace: str) -> set[int]:
    """The outboxes named by the namespace's live feeds (not destroyed, a live process
    attached): the channels that outlive their holders."""
    named: set[int] = set()
    prefix = _names.prefix(namespace)
    try:
        files = os.listdir(_names.SHM_DIR)
    except OSError:
        return named
    for file in files:
        if not file.startswith(prefix):
            continue
        entry = _names.parse_entry(namespace, file)
        if entry is None or entry.kind is not _names.EntryKind.FEED:
            continue
        named |= _outboxes_of(entry.path)
    return named


def _outboxes_of(path: str) -> set[int]:
    try:
        mapped = _shm.map_own(path, length=L.HEADER_BYTES)
    except (OSError, ValueError):
        return set()
    if mapped is None:
        return set()
    mapping, size = mapped
    words = memoryview(mapping).cast("Q")
    try:
        if words[L.MAGIC] != L.FEED_KIND.magic or words[L.DESTROYED]:
            return set()
        if not any(L.slot_alive(pid, ticks) for pid, ticks in L.attached_processes(words)):
            return set()
        return {int(words[_first_word(index) + CHANNEL_ID]) for index in range(ENTRIES)
                if words[_first_word(index) + KEY]}
    finally:
        words.release()
        mapping.close()


def is_kept(namespace: str, channel_id: int, flags: int) -> bool:
    """Whether a channel with ``flags`` outlives its holders now: an outbox that a live
    feed names."""
    return bool(flags & L.FLAG_OUTBOX) and channel_id in named_channels(namespace)
