"""Fuzzing (hypothesis) of what reads untrusted bytes: a channel's ring reader, the registry's
socket and its request handler (issue 7).

A corrupt ring may only ever give a value, ``TimeoutError``, ``ChannelClosed`` or
``ChannelCorruptError`` (or ``UnknownTypeError`` for bytes that name a type) — never another exception, a hang or a crash — and once its
header words are consistent again the channel works. The registry answers ``ping`` after
any garbage. Each test prints how many inputs it tried (``pytest -s`` shows them).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmfeed
from shmfeed import _layout as L
from shmfeed import _registry, _registry_client
from shmfeed.testing import ping_registry, registry_pid

RING = 4096
# The suite's runs are regression guards (derandomized: the same cases every run); set
# SHMFEED_FUZZ_SCALE=10 for a longer hunt.
FUZZ_SCALE = float(os.environ.get("SHMFEED_FUZZ_SCALE", "1"))


def examples(count: int) -> int:
    return max(10, int(count * FUZZ_SCALE))


SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
ALLOWED = (TimeoutError, shmfeed.ChannelClosed, shmfeed.ChannelCorruptError, shmfeed.UnknownTypeError)
U64 = (1 << 64) - 1

counts: dict[str, int] = {}


def tried(name: str) -> None:
    counts[name] = counts.get(name, 0) + 1


def report(name: str) -> None:
    print(f"\nfuzz {name}: {counts.get(name, 0)} inputs")


def drain(channel: shmfeed.Channel, limit: int = 64) -> list[Any]:
    """recv(timeout=0) until TimeoutError; only the allowed outcomes may happen."""
    got = []
    for _ in range(limit):
        try:
            got.append(channel.recv(timeout=0))
        except TimeoutError:
            return got
        except (shmfeed.ChannelClosed, shmfeed.ChannelCorruptError, shmfeed.UnknownTypeError) as error:
            got.append(error)
    return got


def restore_and_check(channel: shmfeed.Channel, position: int, sent: int, probe: Any) -> None:
    """Make the header consistent (READ_POS = WRITE_POS, RECEIVED = SENT): the channel works."""
    words = channel._core.words  # type: ignore[union-attr]
    assert words[L.LOCK_OWNER] == 0 and words[L.RECV_LOCK_OWNER] == 0 and words[L.WAIT_LOCK_OWNER] == 0
    words[L.READ_POS] = words[L.WRITE_POS] = position
    words[L.RECEIVED] = words[L.SENT] = sent
    channel.send(probe, timeout=5)
    assert channel.recv(timeout=5) == probe
    with pytest.raises(TimeoutError):
        channel.recv(timeout=0)


# Positions of any alignment: writers keep them 8-byte aligned, a corrupt header need not.
aligned_position = st.one_of(st.integers(0, 64 * RING), st.integers(0, U64),
                             st.integers(0, 64 * RING).map(lambda v: v & ~7))
count_word = st.one_of(st.integers(0, 10_000), st.integers(0, U64))
probe_value = st.one_of(st.binary(max_size=64), st.binary(min_size=1500, max_size=3000), st.integers(),
                        st.text(max_size=20))


@pytest.mark.timeout(60)
@settings(max_examples=examples(200), **SETTINGS)
@given(data=st.data())
def test_fuzz_ring_reader_random_bytes_and_header(data: st.DataObject) -> None:
    tried("ring random bytes + header words")
    channel = _channel()
    core = channel._core  # type: ignore[union-attr]
    buffer, words = core.buffer, core.words
    for _ in range(data.draw(st.integers(1, 4))):
        offset = data.draw(st.integers(0, RING - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=RING - offset))
        buffer[L.HEADER_BYTES + offset : L.HEADER_BYTES + offset + len(chunk)] = chunk
    write_pos = data.draw(aligned_position)
    read_pos = data.draw(st.one_of(aligned_position, st.integers(0, RING).map(lambda d: max(0, write_pos - (d & ~7)))))
    words[L.WRITE_POS], words[L.READ_POS] = write_pos, read_pos
    words[L.SENT], words[L.RECEIVED] = data.draw(count_word), data.draw(count_word)
    drain(channel)
    restore_and_check(channel, data.draw(st.integers(0, 1 << 40)) & ~7, data.draw(st.integers(0, 1 << 40)),
                      data.draw(probe_value))


values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30),
              st.binary(max_size=200)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=5), inner, max_size=4), st.frozensets(st.integers())),
    max_leaves=12,
)


@pytest.mark.timeout(60)
@settings(max_examples=examples(200), **SETTINGS)
@given(data=st.data())
def test_fuzz_ring_reader_mutated_valid_records(data: st.DataObject) -> None:
    tried("ring mutated valid records")
    channel = _channel()
    core = channel._core  # type: ignore[union-attr]
    # Inline records and spill records (over a quarter of the ring) alike.
    sent = data.draw(st.lists(st.one_of(values, st.binary(min_size=300, max_size=900),
                                        st.binary(min_size=1100, max_size=3000)), min_size=1, max_size=8))
    start_pos = core.words[L.WRITE_POS]
    delivered = []
    for value in sent:
        try:
            channel.send(value, timeout=0)
        except TimeoutError:
            break
        delivered.append(value)
    end_pos = core.words[L.WRITE_POS]
    span = max(8, min(end_pos - start_pos, RING))
    for _ in range(data.draw(st.integers(1, 6))):
        where = (start_pos + data.draw(st.integers(0, span - 1))) % RING
        core.buffer[L.HEADER_BYTES + where] ^= data.draw(st.integers(1, 255))
    # A flipped length byte can make the rest of a record parse as further valid records:
    # the ring carries no checksum, so more values than were sent may come out. Only the
    # kinds of outcome are checked.
    drain(channel)
    restore_and_check(channel, core.words[L.WRITE_POS], core.words[L.SENT], data.draw(probe_value))


_channels: dict[str, shmfeed.Channel] = {}


def _channel() -> shmfeed.Channel:
    """One small channel per test (and namespace), reused by its examples."""
    namespace = os.environ["SHMFEED_NAMESPACE"]
    channel = _channels.get(namespace)
    if channel is None:
        _channels.clear()
        channel = _channels[namespace] = shmfeed.Channel(capacity=16, buffer_size=RING)
    # Each example starts from the same state (hypothesis replays examples).
    core = channel._core  # type: ignore[union-attr]
    words = core.words
    words[L.READ_POS] = words[L.WRITE_POS] = words[L.RECEIVED] = words[L.SENT] = 0
    core.buffer[L.HEADER_BYTES : L.HEADER_BYTES + RING] = bytes(RING)
    return channel


@pytest.fixture(autouse=True)
def _forget_channels(monkeypatch: pytest.MonkeyPatch, namespace: str):
    monkeypatch.setenv("SHMFEED_NO_REGISTRY", "1")  # the ring tests need no registry
    yield
    _channels.clear()


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    for name in counts:
        report(name)


@pytest.mark.timeout(30)
def test_unaligned_read_pos_near_ring_end_is_reported_as_corrupt() -> None:
    """A READ_POS within 8 bytes of the ring's end and not 8-aligned (a corrupt header word)
    must give ChannelCorruptError, and must not leave the receive lock taken."""
    channel = shmfeed.Channel(capacity=16, buffer_size=RING)
    core = channel._core  # type: ignore[union-attr]
    words = core.words
    words[L.READ_POS] = RING - 3
    words[L.WRITE_POS] = RING - 3 + 16
    words[L.SENT], words[L.RECEIVED] = 1, 0
    outcome: Any = None
    try:
        channel.recv(timeout=0)
    except BaseException as error:  # noqa: BLE001 - inspected below
        outcome = error
    wedged = words[L.RECV_LOCK_OWNER] == os.getpid()
    if wedged:  # let the fixture's teardown detach without waiting on our own lock
        words[L.RECV_LOCK_OWNER] = 0
        core.recv_lock.release()
    words[L.READ_POS] = words[L.WRITE_POS] = 0
    words[L.RECEIVED] = words[L.SENT] = 0
    assert isinstance(outcome, shmfeed.ChannelCorruptError), repr(outcome)
    assert not wedged, "the receive lock was left taken: every later recv would hang"


@pytest.mark.timeout(30)
def test_corrupt_spill_size_is_reported_as_corrupt() -> None:
    channel = shmfeed.Channel(capacity=16, buffer_size=RING)
    core = channel._core  # type: ignore[union-attr]
    channel.send(b"s" * 3000)  # over a quarter of the ring: a spill record
    assert core.words[L.SPILLED] == 1
    # The record: 8-byte header, then (spill id u64, size u64).
    struct.pack_into("<Q", core.buffer, L.HEADER_BYTES + 16, 1 << 40)
    with pytest.raises(shmfeed.ChannelCorruptError):
        channel.recv(timeout=0)
    channel.send(b"after")
    assert channel.recv(timeout=5) == b"after"


# --- the registry ------------------------------------------------------------------------------


def _start_registry(namespace: str, monkeypatch: pytest.MonkeyPatch) -> tuple[shmfeed.Channel, int]:
    monkeypatch.delenv("SHMFEED_NO_REGISTRY", raising=False)
    channel = shmfeed.Channel()
    return channel, registry_pid(namespace, 30)


def _send_raw(path: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(3)
        connection.connect(path)
        try:
            connection.sendall(data)
            connection.shutdown(socket.SHUT_WR)
            while connection.recv(65536):
                pass
        except OSError:
            pass  # the registry may close on us: fine


def _wait_registry_gone(namespace: str) -> None:
    deadline = time.monotonic() + 15
    while _registry_client.is_running(namespace) and time.monotonic() < deadline:
        time.sleep(0.02)


msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), U64), st.floats(), st.text(max_size=40),
              st.binary(max_size=100)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5),
                            st.dictionaries(st.integers(-5, 5), inner, max_size=3)),
    max_leaves=20,
)
requests = st.one_of(
    msgpack_values,
    st.fixed_dictionaries({"op": st.one_of(st.sampled_from(["ping", "recover", "snapshot", "", "PING", "nope"]),
                                           msgpack_values)},
                          optional={"namespace": msgpack_values, "pid": msgpack_values, "x": msgpack_values}),
)


@pytest.mark.timeout(120)
def test_fuzz_registry_socket(namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    channel, pid = _start_registry(namespace, monkeypatch)
    path = _registry_client.socket_path(namespace)
    name = "registry socket"

    @settings(max_examples=examples(125), **SETTINGS)
    @given(st.one_of(
        st.binary(max_size=300).map(lambda b: ("raw", b)),
        requests.map(lambda r: ("frame", r)),
        st.tuples(st.integers(0, 1 << 32 - 1), st.binary(max_size=64)).map(lambda t: ("header", t)),
    ))
    def fuzz(case: tuple[str, Any]) -> None:
        tried(name)
        kind, payload = case
        if kind == "raw":
            data = payload
        elif kind == "frame":
            body = msgpack.packb(payload, use_bin_type=True)
            data = struct.pack("<I", len(body)) + body
        else:
            length, body = payload
            data = struct.pack("<I", length) + body
        _send_raw(path, data)
        assert ping_registry(namespace, 5) == pid, "the registry stopped answering"

    fuzz()
    channel.close()
    del channel
    _wait_registry_gone(namespace)


any_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.binary(max_size=20),
              st.builds(object), st.sampled_from([int, type, Ellipsis, NotImplemented, float("nan")])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner), st.sets(st.integers(), max_size=3),
                            st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.none(), st.tuples()),
                                            inner, max_size=4)),
    max_leaves=15,
)


@pytest.mark.timeout(120)
def test_fuzz_registry_answer(namespace: str) -> None:
    registry = _registry.Registry(namespace, 1)
    name = "registry answer"

    @settings(max_examples=examples(200), **SETTINGS)
    @given(st.one_of(any_value, requests, st.fixed_dictionaries({"op": any_value}, optional={"y": any_value})))
    def fuzz(message: Any) -> None:
        tried(name)
        answer = registry.answer(message)
        assert isinstance(answer, dict) and "ok" in answer, answer
        msgpack.packb(answer, use_bin_type=True)  # it can be sent back

    try:
        fuzz()
    finally:
        registry.selector.close()
