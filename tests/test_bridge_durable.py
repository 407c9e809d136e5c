"""``shmfeed bridge --durable`` (JetStream) end to end: a real nats-server with a store per
test, namespaces on this host standing for hosts, each with its own bridge process; the
receiving bridge SIGKILLed and the server restarted while values flow."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmfeed
from shmfeed import _bridge_durable, _bridge_status, _gc, _marks, _names, _outbox, _recovery, _ring
from shmfeed.testing import wait_until

from _nats import BridgeProcess, NatsServer
from test_bridge import Subscriber, hosts, in_namespace  # noqa: F401 (hosts: a fixture)

pytestmark = pytest.mark.timeout(120)

DURABLE = ("--durable",)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    nats = NatsServer(tmp_path / "jetstream")
    nats.start()
    try:
        yield nats
    finally:
        nats.stop()


def _stopped(bridge: BridgeProcess) -> dict[str, Any]:
    code, last = bridge.stop(30, stderr_ok=True)
    assert "Traceback" not in bridge.errors, bridge.errors
    assert code == 0, f"the bridge in {bridge.namespace} exited {code}"
    assert last.startswith("stopped: "), last
    return dict(json.loads(last.removeprefix("stopped: ")))


def _stream_info(url: str, realm: str = "default") -> Any:
    import nats

    async def ask() -> Any:
        client = await nats.connect(url, allow_reconnect=False)
        try:
            return await client.jetstream().stream_info(_bridge_durable.stream_name(realm))
        finally:
            await client.close()

    return asyncio.run(ask())


def _published(namespace: str, feed: str) -> int:
    """What the bridge of ``namespace`` says it published on ``feed`` (its status file;
    a durable bridge counts a value once JetStream acknowledged it)."""
    for status in _bridge_status.read_all(namespace):
        for entry in status["feeds"]:
            if entry["name"] == feed:
                return int(entry["out"])
    return 0


class Collector:
    """A subscriber in the current namespace whose thread keeps every value it gets."""

    def __init__(self, feed: str) -> None:
        self.subscriber = Subscriber(feed)
        self.values: list[Any] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        channel = self.subscriber.channel
        while True:
            try:
                self.values.append(channel.recv())
            except shmfeed.ChannelClosed:
                return

    def close(self) -> None:
        self.subscriber.close()
        self.thread.join(10)


def _ticks_from_a_to_b(server: NatsServer, a: str, b: str
                       ) -> tuple[Collector, BridgeProcess, BridgeProcess, shmfeed.Feed[Any]]:
    """A collector of feed "ticks" in namespace ``b``, durable bridges in ``a`` and ``b``,
    and the feed in ``a`` (this process's namespace) to send on."""
    with in_namespace(b):
        collector = Collector("ticks")
    bridge_a = BridgeProcess(server.url, a, ["ticks"], options=DURABLE)
    bridge_b = BridgeProcess(server.url, b, ["ticks"], options=DURABLE)
    return collector, bridge_a, bridge_b, shmfeed.Feed("ticks")


def _each_once_in_order(feed: shmfeed.Feed[Any], collector: Collector, sent: int,
                        sending_bridge: BridgeProcess) -> dict[str, Any]:
    """After a stream of ``{"n": 0..sent-1}``: an end marker sent, and every value arrived
    once, in order, with nothing dropped by the sending bridge; its statistics."""
    feed.send({"n": "end"})
    wait_until(lambda: collector.values and collector.values[-1] == {"n": "end"}, 60, "the last value")
    numbers = [value["n"] for value in collector.values[:-1]]
    statistics = dict(_stopped(sending_bridge)["ticks"])
    assert numbers == list(range(sent)), (
        f"{sent} sent, {len(numbers)} received; "
        f"missing {sorted(set(range(sent)) - set(numbers))[:10]}, "
        f"twice {sorted(n for n in set(numbers) if numbers.count(n) > 1)[:10]}; "
        f"first out of order at {next((i for i, n in enumerate(numbers) if n != i), None)}; "
        f"sending bridge: {statistics}")
    assert statistics["dropped"] == {}, statistics
    return statistics


def test_values_cross_durably_exactly_once_in_order_with_exact_types(server: NatsServer, hosts: list[str]) -> None:
    a, b = hosts[:2]
    with in_namespace(b):
        remote = Subscriber("prices")
    bridge_a = BridgeProcess(server.url, a, ["prices"], options=DURABLE)
    bridge_b = BridgeProcess(server.url, b, ["prices"], options=DURABLE)
    try:
        assert "(durable)" in bridge_a.ready_line
        feed = shmfeed.Feed("prices")
        big = bytes(range(256)) * (3 * 4096)  # 3 MiB: split over the default 1 MiB max_payload
        values = [{"n": n, "pair": (n, str(n))} for n in range(50)] + [{"n": 50, "big": big}, {"n": 51}]
        for value in values:
            assert feed.send(value) == 1  # the bridge's channel
        got = [remote.channel.recv(20) for _ in values]
        assert got == values
        assert type(got[0]["pair"]) is tuple and type(got[50]["big"]) is bytes
        with pytest.raises(TimeoutError):
            remote.channel.recv(0.3)  # nothing twice
        feed.detach()
        assert _stopped(bridge_a)["prices"] == {"out": 52, "in": 0, "dropped": {}, "redelivered": 0}
        assert _stopped(bridge_b)["prices"] == {"out": 0, "in": 52, "dropped": {}, "redelivered": 0}
        info = _stream_info(server.url)
        assert info.config.duplicate_window == _bridge_durable.DUPLICATE_WINDOW
        assert str(getattr(info.config.storage, "value", info.config.storage)) == "file"
    finally:
        bridge_a.end()
        bridge_b.end()
        remote.close()


@pytest.mark.parametrize("server_kill", [False, True], ids=["server-sigterm", "server-sigkill"])
def test_a_sigkilled_receiving_bridge_and_a_restarted_server_lose_and_repeat_nothing(
        server: NatsServer, hosts: list[str], server_kill: bool) -> None:
    """The receiving side's bridge SIGKILLed mid-stream and started again, then the NATS
    server stopped (SIGTERM or SIGKILL) and started again with its store, while a sender
    keeps sending: every value arrives once, in order."""
    a, b = hosts[:2]
    collector, bridge_a, bridge_b, feed = _ticks_from_a_to_b(server, a, b)
    sent = 0
    stop = threading.Event()

    def send() -> None:
        nonlocal sent
        while not stop.is_set() and sent < 30000:
            feed.send({"n": sent})
            sent += 1
            if sent % 50 == 0:
                stop.wait(0.01)  # a steady stream (~5,000/s), not a burst the bridge's channel drops

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_until(lambda: len(collector.values) > 2000, 30, "values crossing before the kill")
        bridge_b.kill()  # SIGKILL, mid-stream
        before = len(collector.values)
        bridge_b = BridgeProcess(server.url, b, ["ticks"], options=DURABLE)
        wait_until(lambda: len(collector.values) > before + 1000, 30, "values crossing after the restart")
        server.stop(kill=server_kill)  # the store is kept
        server.start()
        wait_until(lambda: len(collector.values) > before + 3000, 60, "values crossing after the server's restart")
    finally:
        stop.set()
        sender.join(30)
    try:
        statistics_a = _each_once_in_order(feed, collector, sent, bridge_a)
        assert statistics_a["out"] == sent + 1
    finally:
        feed.detach()
        bridge_a.end()
        bridge_b.end()
        collector.close()


@pytest.mark.parametrize("kills", [1, 3])
def test_a_sigkilled_sending_bridge_loses_and_repeats_nothing(server: NatsServer, hosts: list[str], kills: int) -> None:
    """The sending side's bridge SIGKILLed mid-stream (``kills`` times) and started again
    while a local sender keeps going, values of 1.5 MiB (spilled, and split over NATS's
    1 MiB max_payload) among them: its outbox outlives it, the successor takes it over and
    goes on after what JetStream stored, so every value arrives once, in order."""
    a, b = hosts[:2]
    collector, bridge_a, bridge_b, feed = _ticks_from_a_to_b(server, a, b)
    big = b"x" * (3 << 19)
    sent = 0
    stop = threading.Event()

    def send() -> None:
        nonlocal sent
        while not stop.is_set() and sent < 30000:
            feed.send({"n": sent, "big": big} if sent % 700 == 3 else {"n": sent})
            sent += 1
            if sent % 50 == 0:
                stop.wait(0.01)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        for round_ in range(kills):
            wait_until(lambda: len(collector.values) > 1500 * (round_ + 1), 30, "values crossing before the kill")
            # Stopped first, so that what it published JetStream stores and acknowledges
            # to a process that never reads it: the outbox still holds values the stream
            # has. Then SIGKILL; the sender goes on meanwhile.
            os.kill(bridge_a.process.pid, signal.SIGSTOP)
            stop.wait(0.3)
            bridge_a.kill()
            bridge_a = BridgeProcess(server.url, a, ["ticks"], options=DURABLE)
        before = len(collector.values)
        wait_until(lambda: len(collector.values) > before + 1000, 30, "values crossing after the restart")
    finally:
        stop.set()
        sender.join(30)
    try:
        _each_once_in_order(feed, collector, sent, bridge_a)
        assert all(value["big"] == big for value in collector.values[:-1] if "big" in value)
    finally:
        feed.detach()
        bridge_a.end()
        bridge_b.end()
        collector.close()


def test_a_killed_bridges_outbox_lives_with_its_feed_and_goes_with_it(server: NatsServer, hosts: list[str]) -> None:
    """With its durable bridge SIGKILLed and none started again, the outbox keeps taking
    the feed's values through recovery and gc (nothing of it is a leftover while the feed
    lives); once the feed's last process lets go, the outbox is a leftover like any other."""
    a = hosts[0]
    feed = shmfeed.Feed("ticks")
    bridge = BridgeProcess(server.url, a, ["ticks"], options=DURABLE)
    outbox = _outbox.find(feed._open().words, _marks.key_of("default"))
    assert outbox is not None
    path = _names.shm_path(_names.channel_segment(a, outbox.channel_id))
    bridge.kill()
    _recovery.recover_namespace(a)
    assert path not in _gc.sweep(a, remove=False).all()
    assert os.path.exists(path)
    assert [feed.send({"n": n}) for n in range(3)] == [1, 1, 1]  # the outbox's subscription lives
    core = _ring.ChannelCore.map_unattached(a, outbox.channel_id)
    assert core is not None
    try:
        assert core.pending() == 3
    finally:
        core.release()
    feed.detach()  # its last process: the feed goes, and nothing names the outbox
    assert path in _gc.sweep(a, remove=False).segments
    _recovery.recover_namespace(a)
    assert not os.path.exists(path)


def test_a_namespace_away_catches_up_in_order(server: NatsServer, hosts: list[str]) -> None:
    a, b = hosts[:2]
    with in_namespace(b):
        remote = Subscriber("orders")
    bridge_a = BridgeProcess(server.url, a, ["orders"], options=DURABLE)
    bridge_b = BridgeProcess(server.url, b, ["orders"], options=DURABLE)
    try:
        _stopped(bridge_b)  # b goes away; its subscriber stays
        feed = shmfeed.Feed("orders")
        for n in range(100):
            feed.send(n)
        wait_until(lambda: _published(a, "orders") == 100, 20, "a's bridge publishing (the stream holds b's values)")
        bridge_b = BridgeProcess(server.url, b, ["orders"], options=DURABLE)  # back: catches up
        assert [remote.channel.recv(20) for _ in range(100)] == list(range(100))
        with pytest.raises(TimeoutError):
            remote.channel.recv(0.3)
        feed.detach()
    finally:
        bridge_a.end()
        bridge_b.end()
        remote.close()


def test_one_durable_bridge_per_namespace_and_realm(server: NatsServer, hosts: list[str]) -> None:
    first = BridgeProcess(server.url, hosts[0], ["x"], options=DURABLE)
    try:
        with pytest.raises(shmfeed.ShmfeedError, match="another durable bridge"):
            shmfeed.Bridge(server.url, ["x"], durable=True).start()
        other_realm = shmfeed.Bridge(server.url, ["x"], realm="other", durable=True, max_age=60.0,
                                     max_bytes=1 << 20).start()
        other_realm.close()
        config = _stream_info(server.url, "other").config
        assert (config.max_age, config.max_bytes) == (60.0, 1 << 20)
    finally:
        first.end()


def test_limits_need_durable_and_must_be_positive() -> None:
    with pytest.raises(ValueError, match="durable=True"):
        shmfeed.Bridge("nats://127.0.0.1:1", ["x"], max_age=10.0)
    for bad in (0, -1, "10", True):
        with pytest.raises(ValueError, match="max_pending must be a positive number"):
            shmfeed.Bridge("nats://127.0.0.1:1", ["x"], durable=True, max_pending=bad)  # type: ignore[arg-type]


def test_a_durable_bridges_lock_file_goes_at_close_and_after_a_kill(server: NatsServer, hosts: list[str]) -> None:
    a = hosts[0]
    lock = _bridge_status.durable_lock_path(a, "default")
    bridge = BridgeProcess(server.url, a, ["x"], options=DURABLE)
    assert os.path.exists(lock)
    _stopped(bridge)
    assert not os.path.exists(lock)  # removed by its bridge at close
    bridge = BridgeProcess(server.url, a, ["x"], options=DURABLE)
    bridge.kill()  # SIGKILL: the file stays, its lock with the process
    _bridge_status.stale(a)  # gc's sweep (the registry's too, which may have been first)
    assert not os.path.exists(lock)
    again = BridgeProcess(server.url, a, ["x"], options=DURABLE)  # and a new one starts
    _stopped(again)


def test_a_messages_stream_sequence_and_pending_count_come_from_its_reply_subject() -> None:
    numbers = _bridge_durable._reply_numbers
    assert numbers("$JS.ACK.SHMFEED_default.shmfeed-abc.1.42.7.1795973705548593291.3") == (42, 3)
    assert numbers("$JS.ACK.hub.ACCHASH.SHMFEED_default.shmfeed-abc.2.42.7.1795973705548593291.3.r4nd") == (42, 3)
    assert numbers("$JS.ACK.hub.ACCHASH.SHMFEED_default.shmfeed-abc.2.42.7.1795973705548593291.3") == (42, 3)
    for other in ("", "_INBOX.abc", "$JS.ACK.a.b.c", "$JS.ACK.S.C.1.x.7.1.3", "$JS.NAK.S.C.1.42.7.1.3"):
        assert numbers(other) == (-1, 0)
