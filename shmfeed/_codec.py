"""msgpack encoding of event values that keeps exact types, with no pickle anywhere.

None, bool, 64-bit int, float, str, bytes, list and dict are native msgpack, packed in C
without calling Python (the hot path); every other supported type becomes a msgpack ext
built by ``_default``, whose payload is msgpack again (or raw bytes). Only exact types are
accepted (``strict_types=True``): a subclass of a built-in is refused instead of silently
arriving as its base type. Decoding rebuilds only the kinds below; a class named in a
payload is looked up by ``module.qualname`` and used only if it is a class of the expected
kind. A class (or registered name) this process does not know is an ``UnknownTypeError``
(the value is dropped, the channel is fine); every other failure is a ``ChannelCorruptError``.

====  ============================  ====  ===================================
code  kind (payload)                code  kind (payload)
====  ============================  ====  ===================================
1     int beyond 64 bits (LE bytes)  10   Decimal (ascii str)
2     tuple [items]                  11   UUID (16 bytes)
3     set [items]                    12   complex (2 little-endian doubles)
4     frozenset [items]              13   Enum [name, value]
5     bytearray (raw bytes)          14   dataclass [name, [field values]]
6     datetime [y..us, fold, tz]     15   NamedTuple [name, [items]]
7     date [y, m, d]                 16   ndarray (u32 n, [dtype.str, shape(, pad)], data)
8     time [h..us, fold, tz]         17   numpy scalar [dtype.str, bytes]
9     timedelta [d, s, us]           18   register_type [name, value]
30+   register_reference_type (to_bytes(obj)); 30 is ``CHANNEL_EXT_CODE`` (Channel)
====  ============================  ====  ===================================
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import struct
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgpack

from shmfeed import _native
from shmfeed._errors import ChannelCorruptError, EncodingError, ShmfeedError, UnknownTypeError

__all__ = ["CHANNEL_EXT_CODE", "encode", "decode", "register_type", "register_reference_type",
           "type_name", "resolve_type"]

CHANNEL_EXT_CODE = 30
(_BIGINT, _TUPLE, _SET, _FROZENSET, _BYTEARRAY, _DATETIME, _DATE, _TIME, _TIMEDELTA,
 _DECIMAL, _UUID, _COMPLEX, _ENUM, _DATACLASS, _NAMEDTUPLE, _NDARRAY, _NPSCALAR,
 _REGISTERED) = range(1, 19)
# Ext-in-ext nesting limit. Each level may add up to 511 C frames of native nesting in
# the packer (its own limit), so this also keeps the C stack well under 8 MiB (measured).
_MAX_DEPTH = 24
_HINT = "register it with shmfeed.register_type(cls, encode, decode)"
# Packed natively by the C packer, so a registration would never be consulted.
_NATIVE = frozenset({type(None), bool, int, float, str, bytes, list, dict,
                     msgpack.ExtType, msgpack.Timestamp})
_DTYPE_OK = frozenset("biufcmMSUV")  # numpy dtype kinds holding no object pointers

_Ext = msgpack.ExtType
_encoders: dict[type, Callable[[Any], msgpack.ExtType]] = {}  # exact type -> ext builder
_ext_decoders: dict[int, Callable[[bytes], Any]] = {}  # ext code -> rebuilder
_registered: dict[str, tuple[type, Callable[[Any], Any]]] = {}  # name -> (cls, decode)
_reference_owners: dict[int, type] = {}  # register_reference_type: ext code -> class
_type_names: dict[type, str] = {}
_resolved: dict[str, type] = {}  # successful resolve_type() only: junk names never pile up


def _default(obj: Any) -> msgpack.ExtType:
    # Called by the C packer only for values it cannot pack natively.
    st = _state
    st.depth += 1
    try:
        if st.depth > _MAX_DEPTH:
            raise _cannot(f"it nests tuples, sets or classes more than {_MAX_DEPTH} deep (or holds "
                          f"a reference cycle)", "flatten the value, or break the cycle", nesting=True)
        fn = _encoders.get(type(obj)) or _discover(type(obj))
        return fn(obj)
    finally:
        st.depth -= 1


def _new_packer() -> msgpack.Packer:
    return msgpack.Packer(strict_types=True, default=_default, use_bin_type=True,
                          autoreset=True)


class _ThreadState(threading.local):
    # Packer is neither thread-safe nor re-entrant: one top-level packer per thread plus
    # one per ext nesting level. Reusing them measured ~2x faster than msgpack.packb with
    # the same options (which builds a new Packer, and its buffer, per call).
    def __init__(self) -> None:
        self.packer = _new_packer()
        self.pool: list[msgpack.Packer] = []
        self.depth = 0  # encode ext nesting (> 0 means inside _default)
        self.ddepth = 0  # decode ext nesting
        self.view_packer: msgpack.Packer | None = None  # for encode_for_send's large values
        self.view: memoryview | None = None  # its last result, valid until the next call
        self.locating = False  # encode is trying parts of a failed value (_bad_part_path)


_state = _ThreadState()


_SCAN_LIMIT = 64 * 1024  # larger output: look at the value, not the bytes, if it is small
_WALK_BUDGET = 1024  # containers and items looked at before falling back to the scan
# The C twin of _has_buffers (_accel.c), or None.
_native_has_buffers: Callable[[Any, int], bool | None] | None = (
    _native.accel.has_buffers if _native.accel is not None else None)


def _checked(packer: msgpack.Packer, out: bytes, value: Any) -> bytes:
    # strict_types still packs bytearray and memoryview as bin, which would decode as
    # bytes. With the C walk, look at the value (a few dozen ns for a usual event).
    # Without it: bin markers are rare in small output, so scan it (memchr) and only then
    # walk the value; in large output (a big blob) the scans cost more than the pack
    # itself, while the value is usually a few items: walk those first.
    if _native_has_buffers is not None:
        found = _native_has_buffers(value, _WALK_BUDGET)
    elif len(out) <= _SCAN_LIMIT and not (0xC4 in out or 0xC5 in out or 0xC6 in out):
        return out
    else:
        found = _has_buffers(value)
    if found is None:  # too big to walk cheaply: trust the bytes
        found = 0xC4 in out or 0xC5 in out or 0xC6 in out
    if found:
        fixed = _fix_buffers(value)
        if fixed is not value:
            return packer.pack(fixed)
    return out


def _has_buffers(value: Any, budget: int = _WALK_BUDGET) -> bool | None:
    """Whether ``value`` holds a bytearray or memoryview where msgpack would see it (in
    dicts and lists; other containers go through ``_default``); None if it is too big to
    tell cheaply."""
    kind = type(value)
    if kind is bytearray or kind is memoryview:
        return True
    pending = [value]
    while pending:
        item = pending.pop()
        if type(item) is dict:
            budget -= len(item)
            for key, member in item.items():
                kind = type(member)
                if kind is bytearray or kind is memoryview or type(key) is memoryview:
                    return True
                if kind is dict or kind is list:
                    pending.append(member)
        elif type(item) is list:
            budget -= len(item)
            for member in item:
                kind = type(member)
                if kind is bytearray or kind is memoryview:
                    return True
                if kind is dict or kind is list:
                    pending.append(member)
        if budget < 0:
            return None
    return False


_walk_buffers = _native_has_buffers or _has_buffers  # the C walk where it was built


def _fix_buffers(v: Any) -> Any:
    tp = type(v)
    if tp is bytearray or tp is memoryview:
        return _default(v)
    if tp is dict:
        items = [(_fix_buffers(k), _fix_buffers(x)) for k, x in v.items()]
        changed = any(a is not k or b is not x for (a, b), (k, x) in zip(items, v.items()))
        return dict(items) if changed else v
    if tp is list:
        new = [_fix_buffers(x) for x in v]
        return new if any(a is not b for a, b in zip(new, v)) else v
    return v  # everything else is handled by _default (and checked there)


def _pack(value: Any) -> bytes:
    # Pack an ext payload (or a re-entrant encode()) with this nesting level's packer.
    st = _state
    pool = st.pool
    while len(pool) < st.depth:
        pool.append(_new_packer())
    packer = pool[st.depth - 1]
    return _checked(packer, packer.pack(value), value)


LARGE_OUTPUT = 64 * 1024  # a send whose last value encoded to more expects another
SEGMENT_MIN = 64 * 1024  # a bytes member this large is kept as its own part, not copied
_SEGMENT_DEPTH = 2  # containers looked into for such members: the value and its members
_SEGMENT_MEMBERS = 64  # a container with more members is packed whole
_BIN32_HEADER = struct.Struct(">BI")  # msgpack bin 32: what msgpack uses past 64 KiB
_EXT32_HEADER = struct.Struct(">BIb")  # msgpack ext 32: what msgpack uses past 64 KiB


class Segments:
    """An encoded value in parts, whose concatenation is its msgpack encoding.

    Big ``bytes`` members of a dict, list or tuple (or of one inside those) are referenced,
    not copied, until the value is written where it travels (a spill file): a copy fewer
    per large send. ``join()`` gives the contiguous bytes where those are needed (a value
    small enough for a ring).
    """

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[bytes | memoryview]) -> None:
        self.parts = parts
        self.size = sum(map(len, parts))

    def __len__(self) -> int:
        return self.size

    def join(self) -> bytes:
        return b"".join(self.parts)


def _is_big_bytes(item: Any) -> bool:
    return type(item) is bytes and SEGMENT_MIN <= len(item) <= 0xFFFF_FFFF


def _members(item: Any) -> Any:
    # What a container packs, in order: a dict's keys and values alternately.
    return (member for pair in item.items() for member in pair) if type(item) is dict else item


def _worth_parts(item: Any, depth: int) -> bool:
    # A container to encode part by part: a big bytes object within _SEGMENT_DEPTH of the top.
    kind = type(item)
    if depth >= _SEGMENT_DEPTH or not (kind is dict or kind is list or kind is tuple):
        return False
    if len(item) > _SEGMENT_MEMBERS:
        return False
    return any(_is_big_bytes(member) or _worth_parts(member, depth + 1) for member in _members(item))


def _emit(item: Any, depth: int, packer: msgpack.Packer, parts: list[bytes | memoryview]) -> None:
    # Append the encoding of item to parts: big bytes objects as themselves, containers
    # worth it part by part, the rest packed.
    if _is_big_bytes(item):
        parts += (_BIN32_HEADER.pack(0xC6, len(item)), item)
    elif not _worth_parts(item, depth) or not _emit_container(item, depth, packer, parts):
        parts.append(packer.pack(item))


def _emit_container(item: Any, depth: int, packer: msgpack.Packer, parts: list[bytes | memoryview]) -> bool:
    # Append a dict, list or tuple worth encoding in parts; False (nothing appended) for a
    # tuple that must be packed whole.
    kind = type(item)
    if kind is tuple:
        items = list(item)
        # A tuple is ext _TUPLE around its items as a list, packed as their own value: a
        # bytearray in there would need the fix-up that encode gives; pack it whole then.
        if _walk_buffers(items, _WALK_BUDGET) is not False:
            return False
        inner: list[bytes | memoryview] = []
        _emit_container(items, depth, packer, inner)
        parts.append(_EXT32_HEADER.pack(0xC9, sum(map(len, inner)), _TUPLE))
        parts += inner
        return True
    if kind is dict:
        parts.append(packer.pack_map_header(len(item)))
    else:
        parts.append(packer.pack_array_header(len(item)))
    for member in _members(item):
        _emit(member, depth + 1, packer, parts)
    return True


def _segments(value: Any, packer: msgpack.Packer) -> Segments | None:
    # The encoding of a value holding big bytes members, in parts; None if it holds none
    # (or is a tuple that must be packed whole).
    # The dicts and lists in it hold no bytearray or memoryview (checked by the caller), so
    # each member packs alone to the same bytes that packing the whole would give.
    if _is_big_bytes(value):  # a big bytes value itself: its header, then the object as it is
        return Segments([bin32_header(len(value)), value])
    if not _worth_parts(value, 0):
        return None
    parts: list[bytes | memoryview] = []
    return Segments(parts) if _emit_container(value, 0, packer, parts) else None


def bin32_header(size: int) -> bytes:
    """The msgpack header of a ``bytes`` value of ``size`` bytes, as bin 32 whatever the
    size (any decoder takes it): what precedes the bytes kept apart, or written in place
    (``Feed.loan``)."""
    return _BIN32_HEADER.pack(0xC6, size)


def encode_for_send(value: object, large: bool) -> bytes | memoryview | Segments:
    """``encode`` for a send that uses the result before it returns.

    With ``large`` (the previous value of this sender was large), the result avoids a copy
    of the value: ``Segments`` if big bytes members can be kept apart, else a view of this
    thread's packer buffer, valid until the next call in this thread (it saves copying the
    output into a bytes object). Anything unusual takes the plain ``encode``.
    """
    st = _state
    if not large or st.depth:
        return encode(value)
    if _walk_buffers(value, _WALK_BUDGET) is not False:  # a bytearray/memoryview, or too big to tell
        return encode(value)
    try:
        segments = _segments(value, st.packer)
    except Exception:  # noqa: BLE001 - encode() raises the proper error, or succeeds
        return encode(value)
    if segments is not None:
        return segments
    packer = _fresh_view_packer(st)
    try:
        packer.pack(value)
    except Exception:  # noqa: BLE001 - as above
        packer.reset()
        return encode(value)
    st.view = packer.getbuffer()
    return st.view


def _fresh_view_packer(st: _ThreadState) -> msgpack.Packer:
    """The thread's view packer, emptied (its last view released first)."""
    packer = st.view_packer
    if st.view is not None:
        view, st.view = st.view, None
        try:
            view.release()
            if packer is not None:
                packer.reset()
        except BufferError:  # a view of it outlived its send (in a traceback): start anew
            packer = None
    if packer is None:
        packer = st.view_packer = msgpack.Packer(
            strict_types=True, default=_default, use_bin_type=True, autoreset=False
        )
    return packer


def _no_common(value: object) -> None:
    """Without the C accelerator no value is common: ``encode`` decides for each."""
    return None


# The C encoder of the common values (``_accel_encode.h``): the bytes msgpack's Packer would
# make, or None for anything else, which the Packer and shmfeed's rules then encode (also
# Feed.send's short path).
encode_common: Callable[[Any], bytes | None] = _native.accel.encode if _native.accel is not None else _no_common


def encode(value: object) -> bytes:
    """Encode ``value`` to msgpack bytes; raise ``EncodingError`` (a TypeError) if it can't.

    The error names where in the value the bad part is (``value["orders"][3].price``),
    found by a second walk after the failure, so a value that encodes pays nothing for it.
    """
    st = _state
    if not st.depth:
        out = encode_common(value)
        if out is not None:
            return out
    try:
        if st.depth:  # called again from inside a register_type encode hook
            st.depth += 1
            try:
                return _pack(value)
            finally:
                st.depth -= 1
        packer = st.packer
        return _checked(packer, packer.pack(value), value)
    except Exception as exc:  # an unsupported part, msgpack limits, recursion, a failing hook
        error = exc if isinstance(exc, EncodingError) else _cannot_because(exc)
        if st.depth or st.locating:  # the outermost encode says where
            raise error from (exc if error is not exc else exc.__cause__)
        where = "value" if getattr(error, "_nesting", False) else _bad_part_path(value)
        problem, fix = getattr(error, "_problem", str(error)), getattr(error, "_fix", "")
        located = _cannot(problem, fix, where=where, nesting=getattr(error, "_nesting", False))
        raise located from (exc if error is not exc else exc.__cause__)


def _encode_many_in_python(values: list[Any], start: int, out: list[bytes]) -> int:
    """Without the C accelerator: ``encode_many``'s C part, which then encodes nothing."""
    return start


# The C encoder of a batch's common values (``_accel_encode.h``): encode_common's bytes of
# values[start:] appended to out, up to the first value that is not common; where it stopped.
_encode_common_many: Callable[[list[Any], int, list[bytes]], int] = (
    _native.accel.encode_many if _native.accel is not None else _encode_many_in_python)


def encode_many(values: list[Any]) -> list[bytes]:
    """``encode`` of each of ``values``, in one loop (a batch of small values pays the
    calls once). Plain ``bytes`` each: a batch keeps them all, so no view of a buffer that
    the next encode reuses (``encode_for_send``'s). Raises ``EncodingError`` as ``encode``."""
    st = _state
    if st.depth:
        return [encode(value) for value in values]
    packer = st.packer
    pack, checked, common_many = packer.pack, _checked, _encode_common_many
    encoded: list[bytes] = []
    try:
        while common_many(values, len(encoded), encoded) < len(values):
            value = values[len(encoded)]  # one that msgpack and shmfeed's rules encode
            encoded.append(checked(packer, pack(value), value))
    except Exception:  # noqa: BLE001 - encode() says what and where
        encode(values[len(encoded)])
        raise
    return encoded


def _cannot(problem: str, fix: str, *, where: str = "value", nesting: bool = False) -> EncodingError:
    """The EncodingError for ``problem`` at ``where``: ``shmfeed: cannot encode ...; <fix>``."""
    error = EncodingError(f"shmfeed: cannot encode {where}: {problem}; {fix}")
    error.path = where  # type: ignore[attr-defined]
    error._problem, error._fix, error._nesting = problem, fix, nesting  # type: ignore[attr-defined]
    return error


def _cannot_because(exc: Exception) -> EncodingError:
    if isinstance(exc, RecursionError) or "recursion limit exceeded" in str(exc):
        error = _cannot("it is nested too deeply (or holds a reference cycle)",
                        "flatten the value, or break the cycle", nesting=True)
    else:
        error = _cannot(f"{type(exc).__name__}: {exc}",
                        "send only what the README's Encoding section lists, or fix the register_type hook")
    error.__cause__ = exc
    return error


_PATH_STEPS = 32  # a longer path says no more than "deep in there"


def _bad_part_path(value: Any) -> str:
    """Where in ``value`` its first unencodable part is: ``value["orders"][3].price``.

    Walks down through dicts, lists, tuples, sets, dataclasses and NamedTuples, into the
    first member that does not encode alone; the part whose members all encode (or that
    has none) is the bad one. Only ever run after an encode failed.
    """
    path = "value"
    node = value
    for _ in range(_PATH_STEPS):
        step = _bad_member(node)
        if step is None:
            return path
        suffix, node, last = step
        path += suffix
        if last:
            return path
    return path + "..."


def _fails(part: Any) -> bool:
    st = _state
    st.locating = True
    try:
        encode(part)
    except Exception:  # noqa: BLE001 - any failure marks the part
        return True
    finally:
        st.locating = False
    return False


def _show_key(key: Any) -> str:
    text = f"{key!r:.60}"
    if type(key) is str:
        text = '"' + text[1:-1].replace('"', '\\"') + '"' if text[0] == "'" else text
    return text


def _bad_member(node: Any) -> tuple[str, Any, bool] | None:
    """(path suffix, member, stop here) of the first member of ``node`` that fails alone."""
    kind = type(node)
    if kind is dict:
        for key, member in node.items():
            if _fails(key):
                return f".keys() holding {_show_key(key)}", key, True
            if _fails(member):
                return f"[{_show_key(key)}]", member, False
    elif kind is list or kind is tuple:
        for index, member in enumerate(node):
            if _fails(member):
                return f"[{index}]", member, False
    elif kind is set or kind is frozenset:
        for member in node:
            if _fails(member):
                return "{...}", member, False  # a member of the set
    elif kind not in _registered_classes() and dataclasses.is_dataclass(node):
        for field in dataclasses.fields(node):
            member = getattr(node, field.name, None)
            if _fails(member):
                return f".{field.name}", member, False
    elif kind not in _registered_classes() and _is_namedtuple(kind):
        for name, member in zip(kind._fields, node):  # type: ignore[attr-defined]
            if _fails(member):
                return f".{name}", member, False
    return None


def _registered_classes() -> set[type]:
    # A registered class travels as its hook makes it: its fields are not the question.
    return {cls for cls, _ in _registered.values()}


def _unpack(data: bytes | memoryview) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True,
                           ext_hook=_ext_hook)


def decode(data: bytes | memoryview) -> object:
    """Decode bytes made by ``encode``; raise ``ChannelCorruptError`` for anything invalid,
    ``UnknownTypeError`` for a value of a type this process does not know."""
    if _decode_common is not None:  # the common values in C, msgpack's results exactly
        return _decode_common(data, decode_with_msgpack)
    return decode_with_msgpack(data)


# The C decoder of the common values (``_accel_decode.h``): anything else, or anything it
# doubts, it hands to the function it is given, so results and errors stay msgpack's.
_decode_common: Callable[[Any, Callable[[Any], object]], object] | None = (
    _native.accel.decode if _native.accel is not None else None)


def decode_with_msgpack(data: bytes | memoryview) -> object:
    """``decode`` by msgpack."""
    try:
        # _DECODE_OPTIONS spelled out: a ** call costs 150 ns more per value
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True, ext_hook=_ext_hook)
    except (ChannelCorruptError, UnknownTypeError):
        raise
    except Exception as exc:  # msgpack, hashing, recursion, memory: all mean bad bytes
        raise _corrupt(f"{type(exc).__name__}: {exc}") from exc


_BIN_HEADERS = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # msgpack bin 8/16/32: bytes of the length after the marker
_EXT_HEADERS = {0xC7: 1, 0xC8: 2, 0xC9: 4}  # ext 8/16/32: length bytes, then the type byte
_FIXEXT_LENGTHS = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


def decode_as_view(data: bytes | memoryview) -> object:
    """Decode like ``decode``, but a value that is bytes, a bytearray or a NumPy array, at
    the top, comes as a read-only view of ``data`` (a memoryview, or an array over it):
    no copy (``Channel.recv_view``). Anything else decodes as usual."""
    view = memoryview(data)
    if len(view) >= 2:
        marker = view[0]
        width = _BIN_HEADERS.get(marker)
        if width is not None:  # bytes
            start = 1 + width
            if len(view) >= start and int.from_bytes(view[1:start], "big") == len(view) - start:
                return view[start:].toreadonly()
        width = _EXT_HEADERS.get(marker)
        fixed = _FIXEXT_LENGTHS.get(marker)
        if fixed is not None and len(view) == 2 + fixed:  # fixext 1..16: the type byte, then the data
            width, start, code = 0, 2, view[1]
        elif width is not None and len(view) >= 2 + width:
            start, code = 2 + width, view[1 + width]
        else:
            width = None
        if width is not None:
            if width == 0 or int.from_bytes(view[1:1 + width], "big") == len(view) - start:
                if code == _BYTEARRAY:
                    return view[start:].toreadonly()
                if code == _NDARRAY:
                    return _ndarray_view(view[start:])
    return decode(data)


def _ndarray_view(data: memoryview) -> Any:
    """An ndarray ext's payload as a read-only array over it (checked as ``_dec_ndarray``)."""
    import numpy as np

    dt, shape, offset = _ndarray_layout(data)
    return np.frombuffer(data.toreadonly(), dtype=dt, offset=offset).reshape(shape)


def _corrupt(problem: str) -> ChannelCorruptError:
    """The error for bytes that are no value encode() makes."""
    return ChannelCorruptError(f"shmfeed: undecodable message: {problem}; that value is lost, the channel goes "
                               f"on (a sender of another shmfeed version, or damage)")


def _ext_hook(code: int, data: bytes) -> Any:
    fn = _ext_decoders.get(code)
    if fn is None:
        raise _corrupt(f"unknown ext code {code}")
    st = _state
    st.ddepth += 1
    try:
        if st.ddepth > _MAX_DEPTH:
            raise _corrupt(f"ext nesting deeper than {_MAX_DEPTH}")
        return fn(data)
    except (ChannelCorruptError, UnknownTypeError):
        raise
    except Exception as exc:
        raise _corrupt(
            f"bad payload for ext code {code}: "
            f"{type(exc).__name__}: {exc}") from exc
    finally:
        st.ddepth -= 1


_DECODE_OPTIONS: dict[str, Any] = {"raw": False, "strict_map_key": False, "use_list": True, "ext_hook": _ext_hook}
# ``decode`` without its error translation, for a C batch (``Ring.take_decoded``, which
# calls it with these keywords): a value it fails on is left in the ring, and the Python
# receive meets it next and raises ``decode``'s error for it.
BATCH_DECODE = (msgpack.unpackb, _DECODE_OPTIONS)


def _items(data: bytes, n: int | None = None) -> list[Any]:
    # Unpack a payload that must be a list (of n items when given).
    v = _unpack(data)
    if type(v) is not list or (n is not None and len(v) != n):
        raise _corrupt(f"malformed ext payload {v!r:.80}")
    return v


# --- names ------------------------------------------------------------------------------

def type_name(tp: type) -> str:
    """``module.qualname`` of ``tp`` (``__mp_main__`` is reported as ``__main__``)."""
    name = _type_names.get(tp)
    if name is None:
        mod = tp.__module__
        # Under spawn the main module is __mp_main__ in children (and also __main__ there),
        # but only __main__ in the parent: one spelling keeps names equal across processes.
        name = f"{'__main__' if mod == '__mp_main__' else mod}.{tp.__qualname__}"
        _type_names[tp] = name
    return name


_package = sys.modules[__package__ or "shmfeed"]


def resolve_type(name: str) -> type | None:
    """The class named ``module.qualname`` in a module this process has imported; else None.

    Never imports: a name read from shared memory must not make this process run a
    module's code (SPEC §3). The receiver imports or registers its types itself.
    """
    if not isinstance(name, str):
        return None
    tp = _resolved.get(name)
    if tp is not None:
        return tp
    parts = name.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        return None
    for i in range(len(parts) - 1, 0, -1):  # longest module prefix that is imported wins
        mod_name = ".".join(parts[:i])
        mod = sys.modules.get(mod_name)
        if mod is None and mod_name == "__mp_main__":
            mod = sys.modules.get("__main__")
        if mod is None:
            continue
        obj: Any = mod
        for attr in parts[i:]:
            # The namespace itself, never getattr: a module's __getattr__ may import
            # submodules (lazy loading), a class's may run any code. Our own package's
            # lazy exports (TypeMuxEvent, ...) import only shmfeed's own modules.
            if obj is _package:
                obj = getattr(obj, attr, None)
            else:
                namespace = getattr(obj, "__dict__", None)
                obj = namespace.get(attr) if isinstance(namespace, Mapping) else None
            if obj is None:
                return None
        if not isinstance(obj, type):
            return None
        _resolved[name] = obj
        return obj
    return None


def unknown_type(name: object, what: str = "class") -> ShmfeedError:
    """The error for a value naming the type ``name``, which cannot be decoded here."""
    if not isinstance(name, str):  # no sender writes that: the bytes are bad
        return _corrupt(f"a {what} named by a {type(name).__name__}, not a str")
    text = f"{name:.120}"
    if resolve_type(name) is not None:
        return UnknownTypeError(text, what, f"{text!r} is not a {what} in this process",
                                "give both processes the same definition of it (the same version of its module)")
    return UnknownTypeError(text, what)


def _is_namedtuple(tp: type) -> bool:
    return issubclass(tp, tuple) and isinstance(getattr(tp, "_fields", None), tuple)


_KINDS: dict[int, tuple[str, Callable[[type], bool]]] = {
    _ENUM: ("Enum", lambda c: issubclass(c, enum.Enum)),
    _DATACLASS: ("dataclass", dataclasses.is_dataclass),
    _NAMEDTUPLE: ("NamedTuple", _is_namedtuple),
}
_kind_cache: dict[tuple[int, str], type] = {}
_dc_names: dict[type, tuple[str, ...]] = {}


def _lookup(kind: int, name: Any) -> type:
    cls = _kind_cache.get((kind, name))
    if cls is None:
        what, ok = _KINDS[kind]
        cls = resolve_type(name)  # None unless name is a str
        if cls is None or not ok(cls):  # never call or use anything that isn't one
            raise unknown_type(name, what)
        _kind_cache[(kind, name)] = cls
    return cls


# --- encoders for kinds found by inspecting the class ----------------------------------

def _discover(tp: type) -> Callable[[Any], msgpack.ExtType]:
    fn: Callable[[Any], msgpack.ExtType]
    if tp.__module__ == "numpy":
        np = sys.modules["numpy"]  # a numpy value exists, so numpy is imported
        if tp is np.ndarray or issubclass(tp, np.generic):
            fn = _encoders[tp] = _enc_ndarray if tp is np.ndarray else _enc_npscalar
            return fn
    kind = next((k for k, (_, ok) in _KINDS.items() if ok(tp)), None)
    if kind is None:
        hint = (" (subclasses of built-in types are not encoded as their base type)"
                if any(issubclass(tp, b) for b in _NATIVE | {tuple, set, frozenset}) else "")
        raise _cannot(f"type {type_name(tp)} is not one shmfeed encodes{hint}", _HINT)
    name = type_name(tp)
    if resolve_type(name) is not tp:  # fail at send time, not in the receiving process
        raise _cannot(f"a {name}: the class is not importable by that name",
                      f"define it at module level, or {_HINT}")
    if kind == _ENUM:
        fn = lambda o: _Ext(_ENUM, _pack([name, o.value]))
    elif kind == _DATACLASS:
        names = tuple(f.name for f in dataclasses.fields(tp))
        fn = lambda o: _Ext(_DATACLASS, _pack([name, [getattr(o, n) for n in names]]))
    else:
        fn = lambda o: _Ext(_NAMEDTUPLE, _pack([name, list(o)]))
    _encoders[tp] = fn
    return fn


def _dec_dataclass(data: bytes) -> Any:
    name, values = _items(data, 2)
    cls = _lookup(_DATACLASS, name)
    names = _dc_names.get(cls)
    if names is None:
        names = _dc_names[cls] = tuple(f.name for f in dataclasses.fields(cls))
    if type(values) is not list or len(values) != len(names):
        raise _corrupt(f"wrong field count for {name}")
    obj: Any = object.__new__(cls)  # no __init__/__post_init__; object.__setattr__ passes frozen
    for n, v in zip(names, values):
        object.__setattr__(obj, n, v)
    return obj


def _dec_namedtuple(data: bytes) -> Any:
    name, values = _items(data, 2)
    cls = _lookup(_NAMEDTUPLE, name)
    if type(values) is not list or len(values) != len(cls._fields):  # type: ignore[attr-defined]
        raise _corrupt(f"wrong item count for {name}")
    return cls._make(values)  # type: ignore[attr-defined]


# --- numpy (imported only when a numpy value is seen or a numpy ext arrives) -----------

def _dtype_str(dt: Any) -> str:
    if dt.kind not in _DTYPE_OK or dt.hasobject or dt.fields is not None or dt.subdtype:
        raise _cannot(f"a numpy value of dtype {dt!r} (object or structured)", _HINT)
    return dt.str


ARRAY_ALIGNMENT = 64  # where a large array's data starts in a top-level value (a cache line)
_ALIGN_FROM = 4096  # arrays of fewer data bytes are not padded


def _enc_ndarray(a: Any) -> msgpack.ExtType:
    meta = [_dtype_str(a.dtype), list(a.shape)]
    head = _pack(meta)
    if a.nbytes >= _ALIGN_FROM:
        # Padding in the header (a third item) puts the data at a multiple of
        # ARRAY_ALIGNMENT from the start of an array sent as the value itself, as it lies
        # in a spill file (recv_view hands out an array over it: aligned, numpy takes its
        # fast paths). The ext header is 6 bytes (ext 32) from 65,536 payload bytes, else 4.
        ext_header = 6 if 4 + len(head) + 2 + a.nbytes >= 1 << 16 else 4
        pad = -(ext_header + 4 + len(head) + 2) % ARRAY_ALIGNMENT
        head = _pack([*meta, bytes(pad)])
    return _Ext(_NDARRAY, b"".join((struct.pack("<I", len(head)), head, a.tobytes())))


def _enc_npscalar(s: Any) -> msgpack.ExtType:
    return _Ext(_NPSCALAR, _pack([_dtype_str(s.dtype), s.tobytes()]))


def _np_dtype(s: Any) -> Any:
    import numpy as np

    # Only plain dtype strings such as "<f8", "|S5", "<M8[ns]"; never object dtypes.
    ok = (type(s) is str and 3 <= len(s) <= 20 and s[0] in "<>|=" and s[1] in _DTYPE_OK
          and s[2:].split("[")[0].isdigit())
    dt = np.dtype(s) if ok else None
    if dt is None or dt.hasobject or dt.str != s:
        raise _corrupt(f"bad numpy dtype {s!r:.40}")
    return dt


def _ndarray_layout(data: bytes | memoryview) -> tuple[Any, list[int], int]:
    """An ndarray ext payload's dtype, shape and data offset, checked against its size."""
    try:
        (n,) = struct.unpack_from("<I", data)
    except struct.error:
        raise _corrupt("bad numpy header") from None
    meta = _items(bytes(data[4:4 + n]))
    if len(meta) not in (2, 3) or (len(meta) == 3 and (type(meta[2]) is not bytes or len(meta[2]) >= ARRAY_ALIGNMENT)):
        raise _corrupt("bad numpy header")
    dtype, shape = meta[0], meta[1]
    dt = _np_dtype(dtype)
    if (type(shape) is not list or len(shape) > 64
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise _corrupt("bad numpy shape")
    size = dt.itemsize
    for d in shape:
        size *= d
    if size != len(data) - 4 - n:
        raise _corrupt("numpy data size does not match shape")
    return dt, shape, 4 + n


def _dec_ndarray(data: bytes) -> Any:
    import numpy as np

    dt, shape, offset = _ndarray_layout(data)
    return np.frombuffer(data, dtype=dt, offset=offset).reshape(shape).copy()


def _dec_npscalar(data: bytes) -> Any:
    import numpy as np

    dtype, raw = _items(data, 2)
    dt = _np_dtype(dtype)
    if type(raw) is not bytes or len(raw) != dt.itemsize:
        raise _corrupt("numpy scalar size mismatch")
    return np.frombuffer(raw, dtype=dt)[0]


# --- date and time --------------------------------------------------------------------

def _tz_state(d: datetime | time) -> list[Any] | None:
    # [offset µs, timezone name, zoneinfo key]. Any other tzinfo travels as its fixed
    # offset: the same instant, so == and utcoffset() hold. The zone key is kept because
    # an aware datetime in a DST fold never compares equal across different tzinfos.
    off = d.utcoffset()
    if off is None:
        return None  # a tzinfo without an offset compares as naive
    tz = d.tzinfo
    name = tz.tzname(None) if type(tz) is timezone else None
    zi = sys.modules.get("zoneinfo")
    key = getattr(tz, "key", None) if zi is not None and type(tz) is zi.ZoneInfo else None
    us = (off.days * 86400 + off.seconds) * 1_000_000 + off.microseconds
    return [us, None if name == timezone(off).tzname(None) else name, key]


def _with_tz(state: Any, build: Callable[[Any], Any]) -> Any:
    if state is None:
        return build(None)
    us, name, key = state
    off = timedelta(microseconds=us)
    if key is not None:
        try:
            from zoneinfo import ZoneInfo

            out = build(ZoneInfo(key))
            if out.utcoffset() == off:  # same zone rules here as at the sender
                return out
        except Exception:  # zone unknown here: the fixed offset still gives the instant
            pass
    return build(timezone(off) if name is None else timezone(off, name))  # timezone(0) is utc


def _dec_datetime(data: bytes) -> datetime:
    *f, fold, tz = _items(data, 9)
    return _with_tz(tz, lambda z: datetime(*f, tzinfo=z, fold=fold))  # type: ignore[misc]


def _dec_time(data: bytes) -> time:
    *f, fold, tz = _items(data, 6)
    return _with_tz(tz, lambda z: time(*f, tzinfo=z, fold=fold))  # type: ignore[misc]


_SET_CHECK_MIN = 4096  # smaller sets build fast whatever their hashes
_SET_PROBES_MAX = 1 << 24  # about 0.1 s of probing: no honest sender's set needs more


def _set_members(data: bytes) -> list[Any]:
    """A set's members, refused if building the set would take quadratic time.

    Members that share a hash (ints differing by multiples of 2**61 - 1, say) make each
    insertion probe all the earlier ones: a forged record of a few MB would take minutes.
    """
    members = _items(data)
    if len(members) >= _SET_CHECK_MIN:
        counts = collections.Counter(map(hash, members))
        if sum(c * c for c in counts.values()) > _SET_PROBES_MAX:
            raise _corrupt(f"a set of {len(members)} members whose "
                                      f"hashes collide (forged?)")
    return members


def _dec_registered(data: bytes) -> Any:
    name, value = _items(data, 2)
    entry = _registered.get(name) if type(name) is str else None
    if entry is None:
        raise unknown_type(name, "registered type")
    return entry[1](value)


_encoders.update({
    # int only reaches _default when it does not fit in 64 bits
    int: lambda n: _Ext(_BIGINT, n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)),
    tuple: lambda o: _Ext(_TUPLE, _pack(list(o))),
    set: lambda o: _Ext(_SET, _pack(list(o))),
    frozenset: lambda o: _Ext(_FROZENSET, _pack(list(o))),
    bytearray: lambda o: _Ext(_BYTEARRAY, bytes(o)),
    datetime: lambda d: _Ext(_DATETIME, _pack([d.year, d.month, d.day, d.hour, d.minute,
                                               d.second, d.microsecond, d.fold, _tz_state(d)])),
    date: lambda d: _Ext(_DATE, _pack([d.year, d.month, d.day])),
    time: lambda t: _Ext(_TIME, _pack([t.hour, t.minute, t.second, t.microsecond, t.fold,
                                       _tz_state(t)])),
    timedelta: lambda t: _Ext(_TIMEDELTA, _pack([t.days, t.seconds, t.microseconds])),
    Decimal: lambda d: _Ext(_DECIMAL, str(d).encode("ascii")),
    UUID: lambda u: _Ext(_UUID, u.bytes),
    complex: lambda c: _Ext(_COMPLEX, struct.pack("<dd", c.real, c.imag)),
})
_builtin_encoders = dict(_encoders)  # restored if a registration over a builtin is replaced
_ext_decoders.update({
    _BIGINT: lambda b: int.from_bytes(b, "little", signed=True),
    _TUPLE: lambda b: tuple(_items(b)),
    _SET: lambda b: set(_set_members(b)),
    _FROZENSET: lambda b: frozenset(_set_members(b)),
    _BYTEARRAY: bytearray,
    _DATETIME: _dec_datetime,
    _DATE: lambda b: date(*_items(b, 3)),
    _TIME: _dec_time,
    _TIMEDELTA: lambda b: timedelta(*_items(b, 3)),
    _DECIMAL: lambda b: Decimal(b.decode("ascii")),
    _UUID: lambda b: UUID(bytes=b),
    _COMPLEX: lambda b: complex(*struct.unpack("<dd", b)),
    _ENUM: lambda b: (lambda name, value: _lookup(_ENUM, name)(value))(*_items(b, 2)),
    _DATACLASS: _dec_dataclass,
    _NAMEDTUPLE: _dec_namedtuple,
    _NDARRAY: _dec_ndarray,
    _NPSCALAR: _dec_npscalar,
    _REGISTERED: _dec_registered,
})


# --- registration hooks ---------------------------------------------------------------

def _check_class(cls: Any) -> None:
    if not isinstance(cls, type):
        raise TypeError(f"shmfeed: cls must be a class, not {type(cls).__name__}; pass the class itself")
    if cls in _NATIVE:
        raise TypeError(f"shmfeed: {cls.__name__} is encoded natively by msgpack and cannot be registered; "
                        f"send it as it is")


def register_type(cls: type, encode: Callable[[Any], Any], decode: Callable[[Any], Any],
                  *, name: str | None = None) -> None:
    """Make instances of exactly ``cls`` encodable as ``encode(obj)``, rebuilt by ``decode``.

    Both processes must register the class under the same ``name`` (default
    ``module.qualname``). Registering a class (or a name) again replaces the old entry.
    """
    _check_class(cls)
    if not callable(encode) or not callable(decode):
        raise TypeError("shmfeed: encode and decode must be callable; pass two functions")
    if name is None:
        name = type_name(cls)
    elif not isinstance(name, str) or not name:
        raise TypeError("shmfeed: name must be a non-empty str; pass one, or leave it out (module.qualname)")
    for old_name, (old_cls, _) in list(_registered.items()):
        if old_cls is cls or old_name == name:
            del _registered[old_name]
            _encoders.pop(old_cls, None)
            if old_cls in _builtin_encoders:
                _encoders[old_cls] = _builtin_encoders[old_cls]
    _registered[name] = (cls, decode)
    _encoders[cls] = lambda o: _Ext(_REGISTERED, _pack([name, encode(o)]))


def register_reference_type(cls: type, ext_code: int, to_bytes: Callable[[Any], bytes],
                            from_bytes: Callable[[bytes], Any]) -> None:
    """Encode exactly ``cls`` as ext ``ext_code`` (30..127) holding ``to_bytes(obj)``."""
    _check_class(cls)
    if type(ext_code) is not int or not CHANNEL_EXT_CODE <= ext_code <= 127:
        raise TypeError(f"shmfeed: ext_code must be an int in {CHANNEL_EXT_CODE}..127; pick one there")
    if not callable(to_bytes) or not callable(from_bytes):
        raise TypeError("shmfeed: to_bytes and from_bytes must be callable; pass two functions")
    owner = _reference_owners.setdefault(ext_code, cls)
    if type_name(owner) != type_name(cls):  # by name: a reloaded module may re-register
        raise ValueError(f"shmfeed: ext code {ext_code} is already used by {type_name(owner)}; pick another")
    _reference_owners[ext_code] = cls
    _encoders[cls] = lambda o: _Ext(ext_code, to_bytes(o))  # ExtType insists on bytes
    _ext_decoders[ext_code] = from_bytes
