"""Tests for shmfeed._codec: exact-type msgpack round trips, errors, hooks and fuzzing."""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
import os
import subprocess
import sys
import threading
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmfeed import _codec
from shmfeed._codec import (
    CHANNEL_EXT_CODE,
    decode,
    encode,
    register_reference_type,
    register_type,
    resolve_type,
    type_name,
)
from shmfeed._errors import ChannelCorruptError, EncodingError, ShmfeedError, UnknownTypeError

pytestmark = pytest.mark.timeout(60)


# --- module-level classes (they must resolve by name) ----------------------------------

class Color(enum.Enum):
    RED = 1
    GREEN = "green"
    BLUE = (1, 2)


class Num(enum.IntEnum):
    ONE = 1
    TWO = 2


class Sym(str, enum.Enum):  # enum.StrEnum is 3.11+; the package supports 3.10
    A = "a"
    B = "b"


if sys.version_info >= (3, 11):
    class StrSym(enum.StrEnum):
        A = "a"

    STR_ENUMS: list[Any] = [StrSym.A]
else:
    STR_ENUMS = []


class Perm(enum.Flag):
    R = 4
    W = 2
    X = 1


@dataclasses.dataclass
class Point:
    x: Any
    y: Any = 0


@dataclasses.dataclass(frozen=True)
class FrozenPoint:
    x: int
    y: int


@dataclasses.dataclass(slots=True)
class SlotPoint:
    x: int
    y: str


@dataclasses.dataclass(frozen=True, slots=True)
class FrozenSlots:
    a: tuple
    b: float


POST_INIT_CALLS: list[int] = []


@dataclasses.dataclass
class WithInitFalse:
    a: int
    b: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        POST_INIT_CALLS.append(self.a)
        self.b = self.a * 10


class Pair(NamedTuple):
    left: Any
    right: Any = None


OldPair = collections.namedtuple("OldPair", "a b")


class MyInt(int):
    pass


class MyStr(str):
    pass


class MyFloat(float):
    pass


class MyDict(dict):
    pass


class MyList(list):
    pass


class MyTuple(tuple):
    pass


class MyBytes(bytes):
    pass


class MyBytearray(bytearray):
    pass


class Money:
    def __init__(self, cents: int, cur: str) -> None:
        self.cents, self.cur = cents, cur

    def __eq__(self, other: object) -> bool:
        return type(other) is Money and (self.cents, self.cur) == (other.cents, other.cur)


class Unregistered:
    pass


class Renamed:
    def __init__(self, v: int) -> None:
        self.v = v


class Twice:
    def __init__(self, v: int) -> None:
        self.v = v


@dataclasses.dataclass
class RegisteredDC:
    v: int


class Reentrant:
    def __init__(self, v: Any) -> None:
        self.v = v


class DummyChannel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return type(other) is DummyChannel and other.name == self.name


# --- exact, deep comparison ------------------------------------------------------------

def typed(x: Any) -> Any:
    """A comparable form of x in which every nested value carries its exact type."""
    t = type(x)
    if t in (list, tuple) or (issubclass(t, tuple) and hasattr(t, "_fields")):
        return (t, [typed(i) for i in x])
    if t is dict:
        return (t, [(typed(k), typed(v)) for k, v in x.items()])
    if t in (set, frozenset):
        return (t, sorted((typed(i) for i in x), key=repr))
    if dataclasses.is_dataclass(x):
        return (t, [typed(getattr(x, f.name)) for f in dataclasses.fields(x)])
    if t is np.ndarray:
        return (t, x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, np.generic):
        return (t, x.dtype.str, x.tobytes())
    if t in (float, complex, Decimal):
        return (t, repr(x))  # NaN-safe, and keeps -0.0 apart from 0.0
    if t in (datetime, time):
        return (t, x.replace(tzinfo=None), x.utcoffset(), x.tzname(), x.fold, x)
    return (t, x)


def roundtrip(value: Any) -> Any:
    out = decode(encode(value))
    assert type(out) is type(value)
    assert typed(out) == typed(value)
    return out


TZ_PLUS = timezone(timedelta(hours=5, minutes=30))
TZ_ODD = timezone(-timedelta(hours=3, seconds=7, microseconds=11), "Odd")

ROUND_TRIP = [
    None, True, False, 0, 1, -1, 2**63 - 1, 2**64 - 1, -(2**63), 2**64, -(2**64) - 1,
    -(2**100), 10**300, -(10**300), 1.5, -0.0, math.inf, -math.inf, math.nan,
    "", "héllo ☃ \x00", b"", b"\x00\xff" * 50, bytearray(), bytearray(b"ab\xc4"),
    [], [1, "a", None], (), (1,), ((1,), (2, (3, ())), []), {}, {"a": 1},
    {(1, 2): "t", frozenset({1, 2}): "f", 3: "i", None: 0, 2.5: 1.5, b"k": 2, "s": (1,)},
    set(), {1, "a", (2, 3), frozenset({4})}, frozenset(), frozenset({frozenset({1}), b"x"}),
    datetime(2024, 2, 29, 23, 59, 59, 999999), datetime(2021, 11, 7, 1, 30, fold=1),
    datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=TZ_PLUS), datetime(2000, 1, 1, tzinfo=timezone.utc),
    datetime(1999, 12, 31, 12, tzinfo=TZ_ODD), datetime.min, datetime.max,
    date(2024, 2, 29), date.min, time(1, 2, 3, 4), time(23, 0, tzinfo=TZ_PLUS, fold=1),
    timedelta(0), timedelta(days=-1, seconds=5, microseconds=7), timedelta.max, timedelta.min,
    Decimal("1.10"), Decimal("-0"), Decimal("1E+1000"), Decimal("Infinity"), Decimal("-Infinity"),
    Decimal("NaN"), Decimal("-sNaN123"), uuid.UUID("12345678-1234-5678-1234-567812345678"),
    complex(1, -2), Color.RED, Color.GREEN, Color.BLUE, Num.TWO, Sym.A, *STR_ENUMS,
    Perm.R | Perm.W, Perm(0),
    Point(1, 2.0), Point((1, "x"), {"k": [Color.RED]}), FrozenPoint(1, 2), SlotPoint(3, "s"),
    FrozenSlots((1, 2), 0.5), Pair(1, "x"), Pair((1,), Pair(2)), OldPair(b"a", [1]),
    np.arange(6, dtype=np.float64).reshape(2, 3), np.array([1, -2], dtype=">i4"),
    np.array([], dtype=np.uint8), np.array(3.5), np.array([True, False]),
    np.array(["ab", "c"]), np.array(["2020-01-01"], dtype="datetime64[ns]"),
    np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)), np.zeros((2, 0, 3)),
    np.float64(1.5), np.int8(-3), np.bool_(True), np.str_("abc"), np.complex64(1 - 1j),
    {"a": [Point(Decimal("1"), (Color.RED, {1, 2}))], (1, "x"): {frozenset({2}): [bytearray(b"x")]}},
    [{"ts": datetime(2020, 1, 1, tzinfo=TZ_PLUS), "ids": {uuid.UUID(int=5)}, "n": 2**70}],
]


@pytest.mark.parametrize("value", ROUND_TRIP, ids=lambda v: type(v).__name__)
def test_round_trip_exact(value: Any) -> None:
    roundtrip(value)


def test_round_trip_specifics() -> None:
    assert decode(encode(Decimal("NaN"))).is_nan()
    assert decode(encode(Decimal("sNaN"))).is_snan()
    assert roundtrip(Color.RED) is Color.RED
    assert roundtrip(datetime(2000, 1, 1, tzinfo=timezone.utc)).tzinfo is timezone.utc
    out = roundtrip(datetime(2021, 11, 7, 1, 30, 0, 17, fold=1))
    assert out.fold == 1 and out.microsecond == 17
    assert roundtrip(np.arange(3)).flags.writeable
    assert decode(memoryview(encode({"a": (1, 2)}))) == {"a": (1, 2)}


def test_zoneinfo_datetime_keeps_instant_and_offset() -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        tz = zoneinfo.ZoneInfo("America/New_York")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no tz database")
    sent = datetime(2021, 11, 7, 1, 30, fold=1, tzinfo=tz)
    out = decode(encode(sent))
    assert type(out) is datetime and out == sent and out.utcoffset() == sent.utcoffset()


def test_dataclass_decode_runs_no_init_or_post_init() -> None:
    sent = WithInitFalse(7)
    assert sent.b == 70
    POST_INIT_CALLS.clear()
    out = roundtrip(sent)
    assert (out.a, out.b) == (7, 70)
    assert POST_INIT_CALLS == []


def test_hot_path_is_plain_msgpack() -> None:
    event = {"id": 1, "price": 1.5, "sym": "ABCD", "ts": 123456789, "side": "buy"}
    assert encode(event) == msgpack.packb(event, use_bin_type=True)
    assert decode(encode(event)) == event


# --- hypothesis round trip -------------------------------------------------------------

TZS = st.builds(timezone, st.timedeltas(min_value=timedelta(hours=-23),
                                        max_value=timedelta(hours=23)))
HASHABLE_LEAVES = (
    st.none() | st.booleans() | st.integers() | st.integers(-(2**200), 2**200)
    | st.floats() | st.text(max_size=10) | st.binary(max_size=10)
    | st.datetimes(timezones=st.none() | TZS) | st.dates() | st.times(timezones=st.none() | TZS)
    | st.timedeltas() | st.decimals(allow_nan=False) | st.uuids() | st.complex_numbers()
    | st.sampled_from(list(Color) + list(Num) + list(Sym) + STR_ENUMS + [Perm.R | Perm.X])
)
LEAVES = (HASHABLE_LEAVES | st.decimals() | st.binary(max_size=10).map(bytearray)
          | st.lists(st.floats(allow_nan=False), max_size=4).map(np.array))
HASHABLES = st.recursive(
    HASHABLE_LEAVES,
    lambda c: st.lists(c, max_size=3).map(tuple) | st.frozensets(c, max_size=3)
    | st.builds(Pair, c, c) | st.builds(FrozenPoint, st.integers(), st.integers()),
    max_leaves=6,
)
VALUES = st.recursive(
    LEAVES,
    lambda c: st.lists(c, max_size=4) | st.lists(c, max_size=4).map(tuple)
    | st.dictionaries(HASHABLES, c, max_size=4) | st.sets(HASHABLES, max_size=4)
    | st.frozensets(HASHABLES, max_size=4) | st.builds(Point, c, c) | st.builds(Pair, c, c),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(VALUES)
def test_property_round_trip(value: Any) -> None:
    roundtrip(value)


# --- fuzzing the decoder ---------------------------------------------------------------

def decode_or_corrupt(data: bytes) -> None:
    try:
        decode(data)
    except (ChannelCorruptError, UnknownTypeError):  # bad bytes, or bytes naming a type not here
        pass  # anything else (or a crash) fails the test


CORPUS = [encode(v) for v in ROUND_TRIP] + [encode(ROUND_TRIP)]


@settings(max_examples=700, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    decode_or_corrupt(data)


@settings(max_examples=800, deadline=None, database=None)
@given(st.sampled_from(CORPUS), st.data())
def test_fuzz_mutated_encodings(valid: bytes, data: st.DataObject) -> None:
    buf = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "set" and buf:
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del buf[i:i + data.draw(st.integers(1, 4))]
        else:
            del buf[i:]
    decode_or_corrupt(bytes(buf))


GARBAGE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8) | st.sampled_from(["os.system", "builtins.int", type_name(Point),
                                               type_name(Color), type_name(Pair), "<f8", "|O8"]),
    lambda c: st.lists(c, max_size=9),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None, database=None)
@given(st.integers(-128, 127) | st.integers(-1, 31), GARBAGE | st.binary(max_size=40))
def test_fuzz_forged_ext_payloads(code: int, payload: Any) -> None:
    raw = payload if type(payload) is bytes else msgpack.packb(payload)
    ext = b"\xc9" + len(raw).to_bytes(4, "big") + code.to_bytes(1, "big", signed=True) + raw
    decode_or_corrupt(ext)
    decode_or_corrupt(b"\x92\x01\x81\xa1k" + ext)  # [1, {"k": ext}]


def test_decode_errors_are_channel_corrupt() -> None:
    nested = msgpack.packb([])
    for _ in range(300):
        nested = msgpack.packb(msgpack.ExtType(2, nested))
    bad = [b"", b"\xc1", b"\x92\x01", b"\x01\x02", b"\xa3ab", b"\xa2\xff\xfe", nested,
           b"\x91" * 200_000 + b"\xc0", msgpack.packb(msgpack.ExtType(29, b"")),
           msgpack.packb(msgpack.ExtType(2, b"\x01")),  # tuple payload that is not a list
           msgpack.packb({(1,): 1}).replace(b"\xc7\x02\x02", b"\xc7\x02\x03")]
    bad.append(b"\x81" + msgpack.packb([1]) + b"\x01")  # unhashable map key
    for data in bad:
        with pytest.raises(ChannelCorruptError):
            decode(data)
    with pytest.raises(ChannelCorruptError):
        decode("not bytes")  # type: ignore[arg-type]


def _ext(code: int, payload: Any) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, msgpack.packb(payload)))


def test_class_lookup_accepts_only_the_right_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    unknown, corrupt = UnknownTypeError, ChannelCorruptError  # a type not here / bad bytes
    forged = [
        (_ext(13, ["os.system", "echo pwned"]), unknown),  # Enum
        (_ext(14, ["os.system", ["echo pwned"]]), unknown),  # dataclass
        (_ext(15, ["os.system", ["echo pwned"]]), unknown),  # NamedTuple
        (_ext(13, ["subprocess.Popen", "true"]), unknown),  # a class, but not an Enum
        (_ext(13, [type_name(Point), 1]), unknown),  # a dataclass is not an Enum
        (_ext(14, [type_name(Color), [1]]), unknown),
        (_ext(15, ["builtins.tuple", [1]]), unknown),  # tuple without _fields
        (_ext(14, [type_name(Point), [1, 2, 3]]), corrupt),  # wrong arity
        (_ext(15, [type_name(Pair), [1]]), corrupt),
        (_ext(13, [type_name(Color), 99]), corrupt),  # no such member
        (_ext(14, ["no_such_module_xyz.Thing", []]), unknown),
        (_ext(14, [["not", "a", "str"], []]), corrupt),
    ]
    for data, error in forged:
        with pytest.raises(error) as raised:
            decode(data)
        assert type(raised.value) is error
    assert called == []


def test_forged_numpy_payloads_are_refused() -> None:
    head = msgpack.packb(["|O8", [2]])
    obj = msgpack.packb(msgpack.ExtType(16, len(head).to_bytes(4, "little") + head + b"\0" * 16))
    head = msgpack.packb(["<f8", [3]])
    short = msgpack.packb(msgpack.ExtType(16, len(head).to_bytes(4, "little") + head + b"\0" * 16))
    for data in (obj, short, _ext(17, ["|O8", b"\0" * 8]), _ext(17, ["<f8", b"\0"])):
        with pytest.raises(ChannelCorruptError):
            decode(data)


# --- encoding errors -------------------------------------------------------------------

def _local_dataclass() -> Any:
    @dataclasses.dataclass
    class Local:
        x: int

    return Local(1)


@pytest.mark.parametrize("value, name", [
    (object(), "object"), (lambda: 0, "function"), (MyInt(5), "MyInt"), (MyStr("s"), "MyStr"),
    (MyFloat(1.0), "MyFloat"), (MyDict(), "MyDict"), (MyList(), "MyList"),
    (MyTuple(), "MyTuple"), (MyBytes(b""), "MyBytes"), (MyBytearray(b"x"), "MyBytearray"),
    ({1, Unregistered()}, "Unregistered"), ([1, {"k": (object(),)}], "object"),
    (np.array([1, None], dtype=object), "object"), (memoryview(b"ab"), "memoryview"),
    ({"a": [memoryview(b"\xc4")]}, "memoryview"), (Unregistered(), "Unregistered"),
    (_local_dataclass(), "Local"), (Color, "EnumType"), (np.array([(1, 2.0)], dtype="i4,f8"), "dtype"),
])
def test_unencodable_raises_encoding_error(value: Any, name: str) -> None:
    with pytest.raises(EncodingError) as info:
        encode(value)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ShmfeedError)
    assert name in str(info.value)
    # The packers were reset: nothing of the failed value leaks into the next message.
    assert encode({"b": (1, 2)}) == msgpack.packb({"b": msgpack.ExtType(2, b"\x92\x01\x02")})


def test_unencodable_message_has_register_hint() -> None:
    with pytest.raises(EncodingError, match=r"register it with shmfeed\.register_type"
                                            r"\(cls, encode, decode\)"):
        encode(Unregistered())


def test_too_deep_or_cyclic_raises_encoding_error() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    mixed: list[Any] = []
    mixed.append((mixed,))
    deep: Any = 1
    for _ in range(200):
        deep = (deep,)
    deep_lists: list[Any] = []
    mixed_deep: Any = deep_lists  # a cycle with 505 lists per ext level: no C stack overflow
    for _ in range(505):
        mixed_deep = [mixed_deep]
    deep_lists.append((mixed_deep,))
    for value in (cyclic, mixed, deep, deep_lists):
        with pytest.raises(EncodingError):
            encode(value)
    thread_errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            encode(deep_lists)
        except BaseException as exc:
            thread_errors.append(exc)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert len(thread_errors) == 1 and isinstance(thread_errors[0], EncodingError)
    ok: Any = 1
    for i in range(20):  # 20 levels of ext nesting are fine
        ok = [Pair(ok)] if i % 2 else (ok,)
    roundtrip(ok)


# --- hooks -----------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are undone afterwards (shmfeed's Channel owns code 30)."""
    for attr in ("_encoders", "_ext_decoders", "_registered", "_reference_owners"):
        monkeypatch.setattr(_codec, attr, dict(getattr(_codec, attr)))


def test_register_type_round_trip_and_replace() -> None:
    with pytest.raises(EncodingError):
        encode(Money(1, "EUR"))
    register_type(Money, lambda m: [m.cents, m.cur], lambda v: Money(*v))
    assert roundtrip({"price": Money(150, "EUR"), "t": (Money(1, "USD"),)})["price"].cents == 150
    register_type(Twice, lambda t: t.v, lambda v: Twice(v))
    register_type(Twice, lambda t: t.v + 1, lambda v: Twice(v * 10))
    assert decode(encode(Twice(1))).v == 20


def test_register_type_with_name_and_precedence() -> None:
    register_type(Renamed, lambda r: r.v, lambda v: Renamed(-v), name="wire.Renamed")
    data = encode(Renamed(3))
    assert b"wire.Renamed" in data and decode(data).v == -3
    register_type(RegisteredDC, lambda d: ["custom", d.v], lambda v: RegisteredDC(v[1] + 1))
    assert decode(encode(RegisteredDC(1))) == RegisteredDC(2)  # registered beats dataclass
    with pytest.raises(UnknownTypeError, match="no registered type 'never.registered'.*register_type"):
        decode(_ext(18, ["never.registered", 1]))


def test_register_type_reentrant_encode() -> None:
    register_type(Reentrant, lambda r: encode(r.v), lambda b: Reentrant(decode(b)))
    out = decode(encode([Reentrant((1, Reentrant({2}))), (3,)]))
    assert out[0].v[0] == 1 and out[0].v[1].v == {2} and out[1] == (3,)


@pytest.mark.parametrize("args", [
    (5, str, str), (Money(1, "x"), str, str), (Money, 5, str), (Money, str, None),
    (int, str, str), (dict, str, str), (bool, str, str),
])
def test_register_type_bad_arguments(args: tuple[Any, Any, Any]) -> None:
    with pytest.raises(TypeError):
        register_type(*args)


def test_register_type_bad_name() -> None:
    with pytest.raises(TypeError):
        register_type(Unregistered, str, str, name=5)  # type: ignore[arg-type]


def test_register_reference_type() -> None:
    assert CHANNEL_EXT_CODE == 30
    if CHANNEL_EXT_CODE in _codec._reference_owners:  # shmfeed.Channel registered itself
        assert _codec._reference_owners[CHANNEL_EXT_CODE].__name__ == "Channel"
        with pytest.raises(ValueError, match="already used"):
            register_reference_type(DummyChannel, CHANNEL_EXT_CODE, bytes, bytes)
    code = CHANNEL_EXT_CODE + 1
    register_reference_type(DummyChannel, code,
                            lambda c: c.name.encode(), lambda b: DummyChannel(b.decode()))
    register_reference_type(DummyChannel, code,  # the same class again: replaced
                            lambda c: c.name.encode(), lambda b: DummyChannel(b.decode()))
    event = {"reply": DummyChannel("ch-1"), "more": (DummyChannel("ch-2"),)}
    data = encode(event)
    raw = msgpack.unpackb(data, ext_hook=lambda c, b: (c, b))
    assert raw["reply"] == (code, b"ch-1")
    assert decode(data) == event
    with pytest.raises(ValueError, match="already used"):
        register_reference_type(Money, code, bytes, bytes)
    for bad in [(DummyChannel, 5, bytes, bytes), (DummyChannel, 128, bytes, bytes),
                (DummyChannel, "30", bytes, bytes), (DummyChannel, 30, None, bytes), (1, 30, bytes, bytes)]:
        with pytest.raises(TypeError):
            register_reference_type(*bad)


# --- names, threads, imports ------------------------------------------------------------

def test_type_name_and_resolve_type() -> None:
    assert type_name(int) == "builtins.int"
    assert type_name(Point) == f"{__name__}.Point"
    assert resolve_type("builtins.int") is int
    assert resolve_type(type_name(Point)) is Point
    assert resolve_type(type_name(uuid.UUID)) is uuid.UUID
    assert resolve_type("collections.OrderedDict") is collections.OrderedDict
    for bad in ["os.system", "no_such_module_xyz.Foo", "int", "builtins.nope", "a b.c", "", 5]:
        assert resolve_type(bad) is None  # type: ignore[arg-type]
    spawned = type("Spawned", (), {"__module__": "__mp_main__"})
    assert type_name(spawned) == "__main__.Spawned"


def test_threads_share_nothing() -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(300):
                value = {"n": n, "i": i, "t": (n, (i,)), "d": Point(n, [i, {i}])}
                assert typed(decode(encode(value))) == typed(value)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_numpy_not_imported_for_plain_values() -> None:
    code = ("import sys, shmfeed._codec as c; "
            "v = {'a': (1, 2**70), 'b': {1.5}, 'c': bytearray(b'x')}; "
            "assert c.decode(c.encode(v)) == v; assert 'numpy' not in sys.modules")
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=cwd, timeout=30)


def test_encode_for_send_gives_a_view_for_large_values_that_lives_until_the_next_call():
    big = {"seq": 1, "text": "abcdefgh" * 32768}  # no big bytes member: no Segments
    first = _codec.encode_for_send(big, True)
    assert type(first) is memoryview and bytes(first) == _codec.encode(big)
    second = _codec.encode_for_send({"seq": 2}, True)
    assert _codec.decode(second) == {"seq": 2}
    with pytest.raises(ValueError):
        len(first)  # released by the call after it: never read stale bytes through it
    assert type(_codec.encode_for_send(big, False)) is bytes
    # What msgpack would flatten (a bytearray) takes the exact-type path, and round-trips.
    tricky = {"blob": bytearray(b"x" * 100_000)}
    assert type(_codec.decode(_codec.encode_for_send(tricky, True))["blob"]) is bytearray
    with pytest.raises(EncodingError):
        _codec.encode_for_send({"bad": object()}, True)
    kept = _codec.encode_for_send(big, True)
    held = kept[:10]  # a view of the view outlives its send (as in a traceback) ...
    again = _codec.encode_for_send(big, True)  # ... a fresh packer takes over
    assert bytes(again) == _codec.encode(big) and bytes(held) == bytes(_codec.encode(big)[:10])


_BLOB = bytes(range(256)) * 512  # 128 KiB: kept as its own part


@pytest.mark.parametrize("value", [
    {"seq": 1, "blob": _BLOB},
    [_BLOB, 2, "three", _BLOB[:_codec.SEGMENT_MIN]],  # a member of exactly SEGMENT_MIN too
    {_BLOB: "a big key", "t": (1, 2), "when": datetime(2024, 1, 2, tzinfo=timezone.utc)},
    {"a": _BLOB, "b": _BLOB, "nested": {"c": _BLOB}, "n": None},  # nested big bytes: packed
    {"blob": _BLOB, "small": b"x" * 100, "set": {1, 2}, "dec": Decimal("1.5")},
    (7, _BLOB),  # a tuple: ext around its items
    {"frames": [_BLOB, _BLOB], "meta": ("m", _BLOB, None)},
], ids=["dict", "list", "bytes-key-and-ext", "two-and-nested", "mixed", "tuple", "nested"])
def test_large_values_travel_in_parts_that_join_to_the_same_encoding(value: object) -> None:
    encoded = _codec.encode_for_send(value, True)
    assert type(encoded) is _codec.Segments
    assert encoded.join() == _codec.encode(value) and len(encoded) == len(encoded.join())
    assert any(part is _BLOB for part in encoded.parts)  # the blob itself: not copied
    decoded = _codec.decode(encoded.join())
    assert decoded == value and type(decoded) is type(value)


@pytest.mark.parametrize("value", [
    {"blob": _BLOB, "bad": object()},  # unencodable member: the plain error, nothing partial
    {"blob": _BLOB, "keep": bytearray(b"x")},  # exact types: a bytearray stays one
    {"blob": _BLOB, **{f"k{i}": i for i in range(100)}},  # too many members: packed whole
    {"blob": bytearray(_BLOB)},  # not bytes
    {"deep": [[_BLOB]]},  # deeper than looked into
])
def test_unusual_large_values_are_encoded_whole(value: object) -> None:
    if "bad" in value:  # type: ignore[operator]
        with pytest.raises(EncodingError):
            _codec.encode_for_send(value, True)
        return
    encoded = _codec.encode_for_send(value, True)
    assert type(encoded) is not _codec.Segments
    decoded = _codec.decode(bytes(encoded))
    assert decoded == value and type(decoded) is type(value)
    if type(value) is dict and "keep" in value:
        assert type(decoded["keep"]) is bytearray


_SIZES = st.sampled_from([_codec.SEGMENT_MIN - 1, _codec.SEGMENT_MIN, 0xFFFF, 0x10000, 100_000])
_LEAF = (st.none() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=5) | st.binary(max_size=8)
         | st.binary(max_size=8).map(bytearray) | _SIZES.map(bytes))
_TREE = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
                     | st.dictionaries(st.text(max_size=3) | st.integers(0, 9), inner, max_size=4),
                     max_leaves=12)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TREE)
def test_parts_always_join_to_the_encoding_and_decode_with_exact_types(value: object) -> None:
    encoded = _codec.encode_for_send(value, True)
    whole = _codec.encode(value)
    assert bytes(encoded.join() if type(encoded) is _codec.Segments else encoded) == whole
    assert typed(_codec.decode(whole)) == typed(value)


@pytest.mark.parametrize("code", [_codec._ENUM, _codec._DATACLASS, _codec._NAMEDTUPLE])
def test_decoding_never_imports_the_module_a_value_names(code: int, tmp_path, monkeypatch) -> None:
    # A module on sys.path that the process has not imported: decoding must not run it.
    (tmp_path / "plantedmod.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('ran').write_text('x')\n"
        "import enum\nclass X(enum.Enum):\n    A = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnknownTypeError, match="'plantedmod.X'.*import its module"):
        decode(_ext(code, ["plantedmod.X", 1] if code == _codec._ENUM else ["plantedmod.X", [1]]))
    assert "plantedmod" not in sys.modules and not (tmp_path / "ran").exists()


def test_a_forged_set_of_colliding_hashes_is_refused_quickly() -> None:
    modulus = (1 << 61) - 1  # ints differing by it share a hash
    forged = msgpack.packb(_codec._Ext(_codec._SET, _codec._pack([i * modulus for i in range(100_000)])))
    with pytest.raises(ChannelCorruptError, match="hashes collide"):
        decode(forged)  # building it would take minutes; the test's timeout would catch it
    assert decode(encode({i * modulus for i in range(1000)})) == {i * modulus for i in range(1000)}


def test_resolving_a_name_runs_no_module_getattr(monkeypatch) -> None:
    import types

    lazy = types.ModuleType("lazymod")
    calls: list[str] = []
    lazy.__getattr__ = lambda name: calls.append(name) or int  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "lazymod", lazy)
    assert resolve_type("lazymod.Anything") is None and calls == []
