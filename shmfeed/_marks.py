"""Delivery marks: what a durable bridge already delivered into a feed, kept in the feed's
segment so that they outlive the bridge process (SPEC §7, exactly once across a SIGKILL).

A durable bridge sends each value from its JetStream stream into the local feed with a
*marked* send (``FeedCore.send(mark=...)``), under the feed's send lock:

1. if the value's stream sequence is at most APPLIED, it was delivered before: nothing is
   sent (the send answers ``ALREADY_APPLIED``);
2. else, unless it is PENDING already, the mark records it as PENDING with SUB_LIMIT (the
   feed's NEXT_SUB_ID: subscriptions made later never get it) and clears the bitmap;
3. each subscription's bit (by table entry) is set as soon as its channel settled the
   value (took it, dropped it by its policy, or ended);
4. APPLIED = the sequence once every subscription settled.

A bridge killed in the middle of 3 leaves PENDING above APPLIED: its successor, getting the
same sequence again from the stream, sends it only to the subscriptions whose bit is clear
and whose id is at most SUB_LIMIT. A ring's commit and its bit are two stores: the C offer
makes them one instruction apart, under the ring's lock (``Ring.offer(..., mark, bit)``);
a kill exactly between them delivers that value twice to that one channel. On the other
paths (a spilled value, a full channel, no C accelerator) the bit follows the commit by a
few Python statements: a wider window, on rarer paths.

Layout (this module owns it): ``ENTRIES`` entries of ``ENTRY_BYTES`` from byte
``FIRST_BYTE`` of the feed header (free in feeds; see ``_layout``), each 4 words (KEY: the
mark's owner, a realm's 64-bit key, 0 = free; APPLIED; PENDING; SUB_LIMIT) and a bitmap of
``FEED_TABLE_SLOTS`` bits. Written only under the feed's send lock.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from . import _layout as L
from ._errors import TableFullError

FIRST_BYTE = 2816  # after the feed's name (bytes 2560-2815)
BITMAP_WORDS = L.FEED_TABLE_SLOTS // 64
ENTRY_WORDS = 4 + BITMAP_WORDS
ENTRY_BYTES = ENTRY_WORDS * 8
ENTRIES = 2  # durable bridges (realms) one feed can have
KEY, APPLIED, PENDING, SUB_LIMIT = range(4)
ALREADY_APPLIED = -1  # what a marked send answers for a value delivered before

assert FIRST_BYTE + ENTRIES * ENTRY_BYTES <= L.HEADER_BYTES
_CLEAR_BITMAP = memoryview(bytes(BITMAP_WORDS * 8)).cast("Q")  # what begin() writes over a bitmap


class Mark(NamedTuple):
    """A marked send's mark: whose (``key``) and the value's stream ``sequence``."""

    key: int
    sequence: int


def key_of(realm: str) -> int:
    """The 64-bit key of a realm's marks (never 0, which marks a free entry)."""
    return int.from_bytes(hashlib.sha256(b"shmfeed-mark:" + realm.encode()).digest()[:8], "little") | 1


def entry_word(words: memoryview, key: int) -> int:
    """The first word of ``key``'s entry, claiming a free one if it has none (send lock held).

    Raises:
        TableFullError: every entry belongs to another realm.
    """
    free = -1
    for index in range(ENTRIES):
        first = FIRST_BYTE // 8 + index * ENTRY_WORDS
        owner = words[first + KEY]
        if owner == key:
            return first
        if owner == 0 and free < 0:
            free = first
    if free < 0:
        raise TableFullError(
            f"shmfeed: this feed already has durable bridges of {ENTRIES} other realms; "
            f"bridge it durably in at most {ENTRIES} realms"
        )
    for word in range(free + 1, free + ENTRY_WORDS):
        words[word] = 0
    words[free + KEY] = key
    return free


def begin(words: memoryview, first: int, sequence: int) -> tuple[int, bool] | None:
    """Start (or resume) the marked send of ``sequence``: None if it was applied already,
    else (the subscription id limit, whether it resumes a send a dead bridge began)."""
    if sequence <= words[first + APPLIED]:
        return None
    if words[first + PENDING] == sequence:
        return int(words[first + SUB_LIMIT]), True
    words[first + 4:first + ENTRY_WORDS] = _CLEAR_BITMAP  # one copy, not a store per word
    words[first + SUB_LIMIT] = words[L.NEXT_SUB_ID]
    words[first + PENDING] = sequence  # last: until now the entry said nothing was pending
    return int(words[first + SUB_LIMIT]), False


def settled(words: memoryview, first: int, table_entry: int) -> None:
    """One subscription (by table entry) settled the pending value."""
    word = first + 4 + table_entry // 64
    words[word] |= 1 << (table_entry % 64)


def word_and_bit(words: memoryview, first: int, table_entry: int) -> tuple[memoryview, int]:
    """Where ``settled`` puts a subscription's bit: the word (a one-word view, for the C
    offer to set it right after its commit) and the bit."""
    word = first + 4 + table_entry // 64
    return words[word:word + 1], 1 << (table_entry % 64)


def is_settled(words: memoryview, first: int, table_entry: int) -> bool:
    return bool(words[first + 4 + table_entry // 64] >> (table_entry % 64) & 1)


def finish(words: memoryview, first: int, sequence: int) -> None:
    """Every subscription settled ``sequence``."""
    words[first + APPLIED] = sequence


def applied(words: memoryview, key: int) -> int:
    """The last sequence ``key`` applied to this feed (0: none), read without the lock."""
    for index in range(ENTRIES):
        first = FIRST_BYTE // 8 + index * ENTRY_WORDS
        if words[first + KEY] == key:
            return int(words[first + APPLIED])
    return 0
