"""What a bridge's NATS message holds: its one owner (SPEC §7; ``_bridge`` sends and reads it).

A message's payload is an envelope followed by the value's encoded bytes (as the ring
holds them), or by one part of them for a value split over NATS's ``max_payload``:

| bytes | field                                                                    |
|-------|--------------------------------------------------------------------------|
| 4     | ``MAGIC`` (``SFB1``: the format and its version)                         |
| 1     | flags: ``PART`` when this message is a part of a split value             |
| 1     | length of the origin (the publishing bridge's random id), 1 to 64        |
| 1     | length of the home (the sending namespace's keyed id), 0 to 64           |
| 2     | length of the feed's name, 1 to ``FEED_NAME_MAX`` (little-endian)        |
| 2     | length of the value's type name, 1 to ``TYPE_NAME_MAX``                  |
| 24    | parts only: value sequence u64, index u32, count u32, whole size u64     |
| ...   | origin, home, feed name, type name (ASCII, ASCII, UTF-8, UTF-8)          |
| ...   | the value's bytes, or this part of them; or, flag ``PACK``: several whole values: their count u32, each one's length u32, their bytes one after another |

NATS headers would carry the same, but building and parsing them cost a bridge more than
everything else it does for a small value; the envelope of a feed's whole values is the
same bytes every time (``whole_prefix``, cached by the bridge). And NATS's own cost is per
message: a bridge packs the small values it has in hand at once (``PACK``, up to
``MAX_PACK``, within ``max_payload``) into one message, in order; it never waits to fill
one. Durable messages add one header, ``Nats-Msg-Id``, for JetStream's deduplication.

Nothing read is trusted: ``parse`` returns None for anything that is not an envelope of
these bounds, and the caller checks what the fields say (the feed's name against the
subject, the parts against each other).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from . import _layout as L

MAGIC = b"SFB1"
PART = 1
PACK = 2
MAX_PACK = 4096  # values in one packed message
_COUNT = struct.Struct("<I")
_HEAD = struct.Struct("<4sBBBHH")
_PART = struct.Struct("<QIIQ")
MAX_ORIGIN = 64
MAX_HOME = 64


class Part(NamedTuple):
    """Where a part belongs: the origin's sequence number of the split value, this part's
    position (from 0), how many parts, the whole value's size."""

    sequence: int
    position: int
    total: int
    size: int


class Envelope(NamedTuple):
    origin: str
    home: str
    feed: str
    type_name: str
    part: Part | None
    data: memoryview  # the value's bytes, or this part of them, or a packed body (``unpack``)
    packed: bool = False


def whole_prefix(origin: str, home: str, feed: str, type_name: str) -> bytes:
    """The envelope of a whole value (the same for every value of one feed and type)."""
    return _prefix(0, origin, home, feed, type_name, b"")


def part_prefix(origin: str, home: str, feed: str, type_name: str, part: Part) -> bytes:
    return _prefix(PART, origin, home, feed, type_name, _PART.pack(*part))


def pack_prefix(origin: str, home: str, feed: str, type_name: str) -> bytes:
    """The envelope of a packed message, before its count, lengths and values."""
    return _prefix(PACK, origin, home, feed, type_name, b"")


def packed(prefix: bytes, values: list[bytes]) -> bytes:
    """A packed message: ``pack_prefix``'s envelope and ``values`` (2 to MAX_PACK)."""
    lengths = struct.pack(f"<{len(values) + 1}I", len(values), *map(len, values))
    return b"".join((prefix, lengths, *values))


def packed_size(values: int, value_bytes: int) -> int:
    """What ``values`` values of ``value_bytes`` in all add to a packed envelope."""
    return 4 * (values + 1) + value_bytes


def unpack(data: bytes | memoryview) -> list[bytes] | None:
    """The values of a packed message's body, or None if it does not add up."""
    if len(data) < 4:
        return None
    (count,) = _COUNT.unpack_from(data)
    start = 4 * (count + 1)
    if not 2 <= count <= MAX_PACK or len(data) < start:
        return None
    lengths = struct.unpack_from(f"<{count}I", data, 4)
    if start + sum(lengths) != len(data):
        return None
    values = []
    for length in lengths:
        values.append(bytes(data[start:start + length]))
        start += length
    return values


def _prefix(flags: int, origin: str, home: str, feed: str, type_name: str, part: bytes) -> bytes:
    texts = (origin.encode("ascii"), home.encode("ascii"), feed.encode("utf-8"), type_name.encode("utf-8"))
    head = _HEAD.pack(MAGIC, flags, *(len(text) for text in texts))
    return b"".join((head, part, *texts))


def parse(payload: bytes) -> Envelope | None:
    """The envelope of a message, or None if it is not one (of these bounds)."""
    if len(payload) < _HEAD.size or payload[:4] != MAGIC:
        return None
    _, flags, origin_length, home_length, feed_length, type_length = _HEAD.unpack_from(payload)
    if (flags & ~(PART | PACK) or flags == PART | PACK or not 0 < origin_length <= MAX_ORIGIN or home_length > MAX_HOME
            or not 0 < feed_length <= L.FEED_NAME_MAX or not 0 < type_length <= L.TYPE_NAME_MAX):
        return None
    at = _HEAD.size
    part = None
    if flags & PART:
        if len(payload) < at + _PART.size:
            return None
        part = Part(*_PART.unpack_from(payload, at))
        at += _PART.size
    end = at + origin_length + home_length + feed_length + type_length
    if len(payload) < end:
        return None
    try:
        origin = payload[at:at + origin_length].decode("ascii")
        at += origin_length
        home = payload[at:at + home_length].decode("ascii")
        at += home_length
        feed = payload[at:at + feed_length].decode("utf-8")
        at += feed_length
        type_name = payload[at:at + type_length].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return Envelope(origin, home, feed, type_name, part, memoryview(payload)[end:], bool(flags & PACK))
