"""``shmfeed bridge`` and ``Bridge`` (core NATS) end to end: a real nats-server per test,
namespaces on this host standing for hosts, each with its own bridge process."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmfeed
from shmfeed import _gc, _release
from shmfeed import _bridge, _bridge_wire
from shmfeed.testing import wait_until

from _nats import BridgeProcess, NatsServer, nats_server, publish_raw
from conftest import _force_remove, _wait_out_destruction

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    with nats_server(tmp_path / "jetstream") as url:
        yield url


@pytest.fixture
def hosts(namespace: str) -> Iterator[list[str]]:
    """Three namespaces standing for three hosts: the test's own first; the other two
    are let go and checked clean at the end, as the autouse fixture does for the first."""
    others = [f"{namespace}-{uuid.uuid4().hex[:4]}", f"{namespace}-{uuid.uuid4().hex[:4]}"]
    yield [namespace, *others]
    for other in others:
        _release.release_namespace(other)
        left = _wait_out_destruction(other)
        if left:
            _gc.sweep(other)
            _force_remove(other)
        assert not left, f"left in /dev/shm by {other}: {left}"


@contextlib.contextmanager
def in_namespace(name: str) -> Iterator[None]:
    """Objects made in the block belong to namespace ``name`` (each reads it when made)."""
    before = os.environ["SHMFEED_NAMESPACE"]
    os.environ["SHMFEED_NAMESPACE"] = name
    try:
        yield
    finally:
        os.environ["SHMFEED_NAMESPACE"] = before


@contextlib.contextmanager
def bridges(url: str, namespaces: list[str], feeds: list[str]) -> Iterator[list[BridgeProcess]]:
    started: list[BridgeProcess] = []
    try:
        for name in namespaces:
            started.append(BridgeProcess(url, name, feeds))
        yield started
    finally:
        for bridge in started:
            bridge.end()  # those the test stopped are gone already


class Subscriber:
    """A channel subscribed to ``Feed(feed)`` in the current namespace."""

    def __init__(self, feed: str) -> None:
        self.feed: shmfeed.Feed[Any] = shmfeed.Feed(feed)
        self.channel: shmfeed.Channel[Any] = shmfeed.Channel(256)
        self.subscription = self.feed.subscribe(self.channel)

    def until(self, markers: set[str], timeout: float = 10.0) -> list[Any]:
        """Everything received until every marker (``{"marker": m}``) came."""
        got: list[Any] = []
        seen: set[str] = set()
        while seen != markers:
            value = self.channel.recv(timeout)
            got.append(value)
            if "marker" in value:
                seen.add(value["marker"])
        return got

    def close(self) -> None:
        self.subscription.unsubscribe()
        self.channel.close()
        self.feed.detach()


def _values(origin: str) -> list[dict[str, Any]]:
    """Values with exact types to check (one feed type: dict)."""
    moment = datetime.datetime(2026, 11, 29, 16, 0, tzinfo=datetime.timezone.utc)
    return [
        {"from": origin, "n": n, "pair": (n, str(n)), "raw": bytes([n]) * (n + 1), "at": moment + datetime.timedelta(seconds=n)}
        for n in range(20)
    ]


def _stopped(bridge: BridgeProcess) -> dict[str, Any]:
    code, last = bridge.stop()
    assert code == 0, f"the bridge in {bridge.namespace} exited {code}"
    assert last.startswith("stopped: "), last
    return dict(json.loads(last.removeprefix("stopped: ")))


def test_three_namespaces_share_a_feed_exactly_once_in_order(nats_url: str, hosts: list[str]) -> None:
    """Two namespaces sending at once, small values and a 3 MiB one (split over the
    server's 1 MiB max_payload): every subscriber of all three gets each once, in order."""
    a, b, c = hosts
    subscribers: dict[str, Subscriber] = {}
    for name in hosts:
        with in_namespace(name):
            subscribers[name] = Subscriber("prices")
    try:
        with bridges(nats_url, hosts, ["prices"]) as (bridge_a, bridge_b, bridge_c):
            with in_namespace(a):
                feed_a = shmfeed.Feed("prices")
            with in_namespace(b):
                feed_b = shmfeed.Feed("prices")
            from_a, from_b = _values("a"), _values("b")
            from_a[10]["raw"] = os.urandom(3 << 20)  # 3 MiB: split, joined, in its place
            for value_a, value_b in zip(from_a, from_b):  # two hosts sending at once
                assert feed_a.send(value_a) == 2  # the local subscriber and the bridge
                feed_b.send(value_b)
            feed_a.send({"marker": "a"})
            feed_b.send({"marker": "b"})
            for name, subscriber in subscribers.items():
                got = subscriber.until({"a", "b"})
                assert [v for v in got if v.get("from") == "a"] == from_a, f"values of a in {name}"
                assert [v for v in got if v.get("from") == "b"] == from_b, f"values of b in {name}"
                assert len(got) == 42, f"{name} got {len(got) - 42} extra values (an echo?)"
                for value in got:
                    if "at" in value:
                        assert type(value["pair"]) is tuple and type(value["raw"]) is bytes
                        assert type(value["at"]) is datetime.datetime and value["at"].tzinfo is not None
            for subscriber in subscribers.values():  # a late echo would come now
                with pytest.raises(TimeoutError):
                    subscriber.channel.recv(0.3)
            feed_a.detach()
            feed_b.detach()
            # What each bridge published is what was sent in its namespace, nothing it injected.
            counts = {name: _stopped(bridge)["prices"] for name, bridge in zip(hosts, (bridge_a, bridge_b, bridge_c))}
            assert counts[a] == {"out": 21, "in": 21, "dropped": {}}
            assert counts[b] == {"out": 21, "in": 21, "dropped": {}}
            assert counts[c] == {"out": 0, "in": 42, "dropped": {}}
    finally:
        for subscriber in subscribers.values():
            subscriber.close()


def test_sigint_and_sigterm_end_a_bridge_with_0(nats_url: str, hosts: list[str]) -> None:
    import signal

    with bridges(nats_url, hosts[:2], ["prices", "orders"]) as (first, second):
        assert _stopped(first) == {name: {"out": 0, "in": 0, "dropped": {}} for name in ("prices", "orders")}
        second.process.send_signal(signal.SIGINT)
        assert second.process.wait(10) == 0


def test_a_value_holding_a_channel_stays_home_counted(nats_url: str, hosts: list[str]) -> None:
    a, b = hosts[:2]
    local = Subscriber("jobs")
    with in_namespace(b):
        remote = Subscriber("jobs")
    reply = shmfeed.Channel(4)
    try:
        with bridges(nats_url, [b], ["jobs"]), shmfeed.Bridge(nats_url, feeds=["jobs"]) as bridge:
            feed = shmfeed.Feed("jobs")
            assert feed.send({"reply": reply}) == 2  # the bridge's channel takes it, then refuses it
            feed.send({"marker": "a"})
            assert local.until({"a"})[0]["reply"] == reply  # the local subscriber got both
            assert remote.until({"a"}) == [{"marker": "a"}]  # only what could leave crossed
            wait_until(lambda: bridge.statistics().feeds[0].out == 1, 10, "the marker published")
            (stats,) = bridge.statistics().feeds
            assert (stats.name, stats.out, stats.in_) == ("jobs", 1, 0)
            assert dict(stats.dropped) == {"local_reference": 1}
            assert bridge.statistics().connected
            feed.detach()
    finally:
        reply.close()
        local.close()
        remote.close()


def test_values_over_max_payload_are_split_and_joined(tmp_path: Path, hosts: list[str]) -> None:
    """A 3 MiB bytes value, and a dict holding one, cross a server whose messages hold 64 KiB
    (49 parts each) exactly once, whole, with their exact types; nothing echoes back."""
    a, b = hosts[:2]
    blob = os.urandom(3 << 20)
    document = {"blob": blob, "pair": (1, "1"), "marker": "doc"}
    with nats_server(tmp_path / "jetstream", max_payload=64 << 10) as url:
        local_blobs, local_docs = Subscriber("blobs"), Subscriber("docs")
        with in_namespace(b):
            remote_blobs, remote_docs = Subscriber("blobs"), Subscriber("docs")
        try:
            with bridges(url, [b], ["blobs", "docs"]) as (bridge_b,), \
                    shmfeed.Bridge(url, feeds=["blobs", "docs"]) as bridge_a:
                blobs, docs = shmfeed.Feed("blobs"), shmfeed.Feed("docs")
                assert blobs.send(blob) == 2 and docs.send(document) == 2
                got_blob = remote_blobs.channel.recv(10)
                assert type(got_blob) is bytes and got_blob == blob
                assert remote_docs.until({"doc"}) == [document]
                assert type(document["pair"]) is tuple
                for subscriber in (remote_blobs, remote_docs, local_blobs, local_docs):
                    if subscriber in (local_blobs, local_docs):
                        subscriber.channel.recv(1)  # its own copy, once
                    with pytest.raises(TimeoutError):
                        subscriber.channel.recv(0.3)  # no second copy, no echo
                counts = {feed.name: (feed.out, feed.in_, dict(feed.dropped)) for feed in bridge_a.statistics().feeds}
                assert counts == {"blobs": (1, 0, {}), "docs": (1, 0, {})}
                blobs.detach()
                docs.detach()
                assert _stopped(bridge_b) == {name: {"out": 0, "in": 1, "dropped": {}} for name in ("blobs", "docs")}
        finally:
            for subscriber in (local_blobs, local_docs, remote_blobs, remote_docs):
                subscriber.close()


def _parts(origin: str, sequence: int, data: bytes, count: int, size: int,
           lengths: list[int] | None = None) -> list[tuple[bytes, dict[str, str] | None]]:
    """Messages carrying ``data`` as ``count`` parts (of ``lengths``, or even), as a bridge
    would (at most the first 8 of an absurd count)."""
    if lengths is None:
        step = -(-len(data) // max(count, 1))
        lengths = [step] * max(1, min(count, 8))
    messages: list[tuple[bytes, dict[str, str] | None]] = []
    start = 0
    for index, length in enumerate(lengths):
        prefix = _bridge_wire.part_prefix(origin, "", "prices", "builtins.dict",
                                          _bridge_wire.Part(sequence, index, count, size))
        messages.append((prefix + data[start:start + length], None))
        start += length
    return messages


def _whole(data: bytes, origin: str = "stranger", feed: str = "prices", type_name: str = "builtins.dict") -> bytes:
    return _bridge_wire.whole_prefix(origin, "", feed, type_name) + data


def test_bad_input_on_the_subject_is_counted_and_passed_over(nats_url: str) -> None:
    """Strangers' messages on a bridge's subject: each is counted by reason and skipped; the
    bridge goes on carrying good values, split or not. No size or count is believed."""
    import msgpack

    from shmfeed import _codec

    subject = _bridge.subject_of("default", "prices")
    good = _codec.encode({"marker": "whole"})
    split_value = {"marker": "split", "pad": "x" * 100}
    split = _codec.encode(split_value)
    envelope = _whole(good)
    truncated = envelope[:len(envelope) - len(good) - 3]  # its lengths say more than it holds
    pack = _bridge_wire.pack_prefix("stranger", "", "prices", "builtins.dict")

    subscriber = Subscriber("prices")
    try:
        with shmfeed.Bridge(nats_url, feeds=["prices"], join_timeout=0.3) as bridge:
            # A split value that never completes (its own origin: nothing after it tells).
            publish_raw(nats_url, subject, _parts("lonely", 1, split, 3, len(split))[:1])
            wait_until(lambda: bridge.statistics().feeds[0].dropped.get("incomplete") == 1, 10, "the part expired")
            publish_raw(nats_url, subject, [
                (os.urandom(64), None),  # no envelope at all
                (good, {"Shmfeed-Origin": "x"}),  # a value without its envelope
                (truncated, None),  # an envelope cut short
                (b"SFB1\x00\x00" + os.urandom(40), None),  # an envelope with no origin
                (_whole(good, feed="orders"), None),  # another feed's name on this subject
                (pack + struct.pack("<3I", 2, len(good), len(good) + 1) + good * 2, None),  # lengths over the body
                (pack + struct.pack("<2I", 1, len(good)) + good, None),  # a pack of one
                (_whole(b"\xc1\xc1"), None),  # not msgpack
                (_whole(_codec.encode(5)), None),  # decodes, but is not of the type it says
                (_whole(msgpack.packb(msgpack.ExtType(_codec.CHANNEL_EXT_CODE, b"\x00" * 16))), None),  # a forged Channel
                *_parts("a", 1, split, 2, 10 ** 12),  # a size over any bound
                *_parts("b", 1, split, 10 ** 9, len(split))[:1],  # a count the size cannot have
                *_parts("c", 1, split, 0, len(split))[:1],  # no parts at all
                *_parts("d", 1, split + b"0" * 10, 3, len(split), [40, 40, 50]),  # parts that add up to more than the size
                *_parts("e", 1, split, 3, len(split))[1:],  # its first part lost
                *_parts("f", 1, split, 3, len(split))[:1], *_parts("f", 2, split, 2, len(split)),  # a part lost
                (_whole(good, origin="g"), None),
                *_parts("h", 7, split, 4, len(split)),
            ])
            # One connection's messages keep their order: f's second value, g's, h's.
            got = [subscriber.channel.recv(10) for _ in range(3)]
            assert got == [split_value, {"marker": "whole"}, split_value]
            (stats,) = bridge.statistics().feeds
            assert dict(stats.dropped) == {"bad_message": 7, "undecodable": 3, "bad_part": 4, "incomplete": 3}
            assert stats.in_ == 3
            with pytest.raises(TimeoutError):
                subscriber.channel.recv(0.2)
    finally:
        subscriber.close()


def test_patterns_bridge_feeds_opened_after_the_bridge_started(nats_url: str, hosts: list[str]) -> None:
    """``--feed 'tick*'`` in one namespace, every feed in the other: feeds opened after both
    bridges started are found and bridged; a feed outside the pattern is not."""
    a, b = hosts[:2]
    local: Subscriber | None = None
    opened_in_b: list[Subscriber] = []
    try:
        with bridges(nats_url, [b], ["tick*"]) as (bridge_b,), shmfeed.Bridge(nats_url) as bridge_a:
            assert bridge_a.statistics().feeds == ()
            local = Subscriber("ticks")
            wait_until(lambda: [f.name for f in bridge_a.statistics().feeds] == ["ticks"], 10, "a's bridge found it")
            with in_namespace(b):
                opened_in_b += [Subscriber("ticks"), Subscriber("other")]
                ticks = shmfeed.Feed("ticks")
            probes = 0
            while True:  # the handshake: b's bridge carries once it has found the feed
                ticks.send({"probe": probes})
                probes += 1
                try:
                    first = local.channel.recv(0.05)
                    break
                except TimeoutError:
                    assert probes < 400, "b's bridge never bridged the feed opened after it started"
            values = [{"n": n} for n in range(20)]
            for value in values:
                ticks.send(value)
            ticks.send({"marker": "end"})
            got = [first, *local.until({"end"})]
            assert [v for v in got if "n" in v] == values
            assert [v["probe"] for v in got if "probe" in v] == list(range(first["probe"], probes))
            ticks.detach()
            summary = _stopped(bridge_b)
            assert set(summary) == {"ticks"}  # not "other"
            assert summary["ticks"]["out"] == len(got)
    finally:
        for subscriber in [*([local] if local else []), *opened_in_b]:
            subscriber.close()


def test_patterns_match_prefixes_and_leave_hidden_feeds_out() -> None:
    assert _bridge.matches("prices", "prices") and not _bridge.matches("prices", "prices2")
    assert _bridge.matches("tick*", "ticks") and _bridge.matches("tick*", "tick") and not _bridge.matches("tick*", "tac")
    assert _bridge.matches("*", "anything") and not _bridge.matches("*", "typemux-state:jobs")
    assert _bridge.matches("typemux-state:*", "typemux-state:jobs")
    with pytest.raises(ValueError):
        shmfeed.Bridge("nats://127.0.0.1:1", feeds=["a*b"])


def test_a_bridge_says_when_nats_goes_and_comes_back(tmp_path: Path, hosts: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """NATS killed and started again on its port: one line on stderr each way, ``connected``
    and ``reconnects`` in the statistics, what was sent meanwhile counted, then carried again."""
    b = hosts[1]
    server = NatsServer(tmp_path / "jetstream")
    url = server.start()
    with in_namespace(b):
        remote = Subscriber("prices")
    try:
        with shmfeed.Bridge(url, feeds=["prices"]) as bridge:
            feed = shmfeed.Feed("prices")
            server.stop(kill=True)
            wait_until(lambda: not bridge.statistics().connected, 10, "the bridge saw NATS go")
            feed.send({"n": 0})
            wait_until(lambda: bridge.statistics().feeds[0].dropped.get("disconnected") == 1, 10, "the drop counted")
            server.start()
            wait_until(lambda: bridge.statistics().connected and bridge.statistics().reconnects == 1, 10,
                       "the bridge reconnected (nats-py calls back just after it says connected)")
            with bridges(url, [b], ["prices"]):
                feed.send({"marker": "after"})
                assert remote.until({"after"}) == [{"marker": "after"}]
            feed.detach()
        lines = capsys.readouterr().err.splitlines()
        assert [line.split(" from ")[0].split(" to ")[0] for line in lines] == \
            ["shmfeed bridge: disconnected", "shmfeed bridge: reconnected"], lines
        assert lines[0].startswith(f"shmfeed bridge: disconnected from {url};") and lines[1] == f"shmfeed bridge: reconnected to {url}"
    finally:
        remote.close()
        server.stop()


def test_the_core_package_does_not_import_nats() -> None:
    import subprocess
    import sys

    code = "import sys, shmfeed; shmfeed.Feed; shmfeed.Channel; shmfeed.Bridge; print('nats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert out.stdout.strip() == "False", out.stderr


def test_subjects_are_valid_and_agree_across_hosts() -> None:
    subject = _bridge.subject_of("default", "prices. *>")
    assert subject == _bridge.subject_of("default", "prices. *>")
    assert subject.startswith("shmfeed.default.") and all(ch.isalnum() or ch == "." for ch in subject)
    assert _bridge.subject_of("default", "a") != _bridge.subject_of("other", "a")
    with pytest.raises(ValueError):
        shmfeed.Bridge("nats://127.0.0.1:1", feeds=["a"], realm="a.b")


def test_nats_killed_mid_stream_local_sends_go_on_and_every_value_is_carried_or_counted(
        tmp_path: Path, hosts: list[str]) -> None:
    """Core mode: NATS killed while a sender keeps sending. The local subscriber gets every
    value and no send waits; each value is published or counted dropped (none silently);
    the remote side gets a part of them, in order, none twice; after NATS is back, new
    values cross again."""
    import threading
    import time as clock

    b = hosts[1]
    server = NatsServer(tmp_path / "jetstream")
    url = server.start()
    with in_namespace(b):
        remote = Subscriber("prices")
    local = shmfeed.Channel(1 << 16)
    feed = shmfeed.Feed("prices")
    subscription = feed.subscribe(local)
    slowest = 0.0
    sent = 0
    try:
        with shmfeed.Bridge(url, feeds=["prices"]) as bridge, bridges(url, [b], ["prices"]):
            def send(count: int) -> None:
                nonlocal sent, slowest
                for _ in range(count):
                    started = clock.monotonic()
                    feed.send({"n": sent})
                    slowest = max(slowest, clock.monotonic() - started)
                    sent += 1

            sender = threading.Thread(target=send, args=(30000,))
            sender.start()
            wait_until(lambda: sent > 5000, 20, "values flowing")
            server.stop(kill=True)
            sender.join(60)
            assert not bridge.statistics().connected or bridge.statistics().reconnects == 0
            server.start()
            wait_until(lambda: bridge.statistics().connected, 20, "the bridge reconnected")
            # The remote bridge may subscribe again only after ours reconnected, and core
            # NATS keeps nothing for it: so a probe a second until one crosses.
            got: list[Any] = []
            probes = 0
            while not got or got[-1] != {"n": "after"}:
                assert probes < 30, "no value crossed in 30 s after NATS came back"
                feed.send({"n": "after"})
                sent += 1
                probes += 1
                try:
                    while not got or got[-1] != {"n": "after"}:
                        got.append(remote.channel.recv(1))
                except TimeoutError:
                    pass
            statistics = bridge.statistics().feeds[0]
        assert [local.recv(0) for _ in range(sent)] == [{"n": n} for n in range(sent - probes)] + [{"n": "after"}] * probes
        assert slowest < 1.0, f"a local send waited {slowest:.3f} s for NATS"
        dropped = sum(statistics.dropped.values())
        assert statistics.out + dropped == sent, (statistics.out, dict(statistics.dropped), sent)
        assert dropped > 0 and set(statistics.dropped) <= {"disconnected", "overflow", "publish_error"}
        numbers = [value["n"] for value in got[:-1]]
        assert numbers == sorted(set(numbers)) and len(numbers) <= statistics.out, "in order, none twice"
    finally:
        subscription.unsubscribe()
        local.close()
        feed.detach()
        remote.close()
        server.stop()
