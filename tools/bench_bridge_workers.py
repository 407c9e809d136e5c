#!/usr/bin/env python3
"""What runs in the child processes of ``tools/bench.py --bridge`` (``bench_bridge``): a
namespace's bridge, feed senders and receivers, raw nats-py publishers and subscribers, and
the two ends of each ping-pong; plus the workload (``Load``) and the flow control
(``Credit``) they share. Every child reports on a ``results`` queue as ``(kind, tag,
payload)``: ``ready``, ``result``, ``stats``, ``unavailable`` or ``error`` (a traceback).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

CTX = mp.get_context("fork")  # fast to start; nothing of shmfeed exists in the parent
READY_TIMEOUT_S = 30.0
CELL_TIMEOUT_S = 60.0
RECV_STALL_S = 15.0  # a receiver that gets nothing for this long: the value was lost
SMALL_VALUE = {"price": 1.5, "sym": "ABCD", "ts": 123456789, "side": "buy"}


# --------------------------------------------------------------------------------------
# The workload and its flow control
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One throughput workload: ``events`` values of ``blob`` bytes (0: a small dict), sent
    at most ``window`` ahead of the receiver, credit coming back every ``chunk`` values."""

    name: str
    events: int
    blob: int
    window: int
    chunk: int
    capacity: int  # the receiving channel's capacity

    def make(self, i: int) -> dict[str, Any]:
        """Value ``i``: its sequence number, and the payload."""
        if self.blob:
            return {"seq": i, "blob": _blob(self.blob)}
        return {"seq": i, **SMALL_VALUE}

    def check(self, value: Any, i: int) -> str | None:
        """None if ``value`` is value ``i``, else what is wrong with it."""
        if not isinstance(value, dict) or value.get("seq") != i:
            got = value.get("seq") if isinstance(value, dict) else type(value).__name__
            return f"expected value {i}, got {got!r} (lost or out of order)"
        if self.blob and len(value.get("blob", b"")) != self.blob:
            return f"value {i}: blob of {len(value.get('blob', b''))} bytes, expected {self.blob}"
        return None

    def encoded_size(self) -> int:
        return len(msgpack.packb(self.make(0)))


_BLOBS: dict[int, bytes] = {}


def _blob(size: int) -> bytes:
    if size not in _BLOBS:
        _BLOBS[size] = bytes(size)
    return _BLOBS[size]




class Credit:
    """Flow control shared by a sender and a receiver process: the sender takes a credit
    before every ``chunk`` values, the receiver gives one back after every ``chunk`` it
    got, so at most ``window`` values are in flight (nothing overflows a lossy hop)."""

    def __init__(self, window: int, chunk: int) -> None:
        self.chunk = chunk
        self._credits = CTX.Semaphore(max(1, window // chunk))

    def take(self, timeout: float = RECV_STALL_S) -> None:
        """Block until the receiver has caught up (raises ``TimeoutError`` after ``timeout``)."""
        if not self._credits.acquire(True, timeout):
            raise TimeoutError(f"no credit back from the receiver for {timeout:.0f} s (a value lost?)")

    def try_take(self) -> bool:
        return bool(self._credits.acquire(False))

    def give(self) -> None:
        self._credits.release()


# --------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------


def _enter_namespace(namespace: str) -> None:
    """In a fresh child: use ``namespace`` for every shmfeed object it makes."""
    import shmfeed

    os.environ["SHMFEED_NAMESPACE"] = namespace
    shmfeed.set_namespace(namespace)


def child_main(target: Callable[..., None], results: Any, tag: str, *args: Any) -> None:
    """Run ``target`` in a child; SIGTERM ends it through its ``finally`` blocks (shared
    memory closed), an exception is reported as ``("error", tag, traceback)``."""

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    if target is bridge_host:
        # Ctrl-C reaches the whole process group: the parent stops the bridges in order
        # (its stop event, then SIGTERM), rather than each at once in the middle of a cell.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        target(results, tag, *args)
    except (KeyboardInterrupt, SystemExit):
        pass
    except BaseException:  # noqa: BLE001
        results.put(("error", tag, traceback.format_exc()))


def bridge_host(results: Any, tag: str, namespace: str, url: str, feeds: list[str], realm: str,
                 durable: bool, stop: Any) -> None:
    """A namespace's bridge, until ``stop`` is set; reports ``ready`` (or ``unavailable``:
    this Bridge takes no ``durable``), then, when stopped, its statistics."""
    _enter_namespace(namespace)
    import shmfeed

    options: dict[str, Any] = {"feeds": feeds, "realm": realm}
    if durable:
        options["durable"] = True
    try:
        bridge = shmfeed.Bridge(url, **options)
    except TypeError as error:
        results.put(("unavailable", tag, f"shmfeed.Bridge(durable=True): {error}"))
        return
    bridge.start()
    try:
        results.put(("ready", tag, None))
        while not stop.wait(0.5):
            pass
    finally:
        stats = bridge.statistics()  # before close(): a close that NATS's end makes slow still reports
        results.put(("stats", tag, {f.name: {"out": f.out, "in": f.in_, "dropped": dict(f.dropped)}
                                    for f in stats.feeds}))
        bridge.close(timeout=3.0)


def feed_sender(results: Any, tag: str, namespace: str, feed_name: str, load: Load, credit: Credit | None,
                 go: Any) -> None:
    """Send ``load`` on ``Feed(feed_name)`` (flow-controlled by ``credit`` unless None)."""
    _enter_namespace(namespace)
    import shmfeed

    feed: shmfeed.Feed[Any] = shmfeed.Feed(feed_name)
    try:
        results.put(("ready", tag, None))
        if not go.wait(READY_TIMEOUT_S):
            return
        send, make = feed.send, load.make
        chunk = credit.chunk if credit is not None else 0
        t0 = time.monotonic_ns()
        for i in range(load.events):
            if chunk and i % chunk == 0:
                credit.take()  # type: ignore[union-attr]
            send(make(i))
        results.put(("result", tag, {"t0": t0}))
    finally:
        feed.detach()


def feed_receiver(results: Any, tag: str, namespace: str, feed_name: str, load: Load,
                   credit: Credit | None) -> None:
    """Receive and check ``load`` from ``Feed(feed_name)``; reports when the last came."""
    _enter_namespace(namespace)
    import shmfeed

    feed: shmfeed.Feed[Any] = shmfeed.Feed(feed_name)
    channel: shmfeed.Channel[Any] = shmfeed.Channel(load.capacity)
    subscription = feed.subscribe(channel)
    try:
        results.put(("ready", tag, None))
        recv, check = channel.recv, load.check
        chunk = credit.chunk if credit is not None else 0
        for i in range(load.events):
            try:
                value = recv(RECV_STALL_S)
            except TimeoutError:
                raise RuntimeError(f"receiver: nothing for {RECV_STALL_S:.0f} s after {i} of {load.events} "
                                   f"values (lost?)") from None
            problem = check(value, i)
            if problem:
                raise RuntimeError(f"receiver: {problem}")
            if chunk and (i + 1) % chunk == 0:
                credit.give()  # type: ignore[union-attr]
        results.put(("result", tag, {"t_end": time.monotonic_ns()}))
    finally:
        subscription.unsubscribe()
        channel.close()
        feed.detach()


def raw_sender(results: Any, tag: str, url: str, subject: str, jetstream: bool, load: Load, credit: Credit,
                go: Any) -> None:
    """Publish ``load`` msgpack-encoded on ``subject`` with nats-py (JetStream: publish_async,
    every ack awaited by the end)."""
    import nats

    async def run() -> None:
        nc = await nats.connect(url, allow_reconnect=False)
        js = nc.jetstream() if jetstream else None
        loop = asyncio.get_running_loop()
        try:
            results.put(("ready", tag, None))
            if not await loop.run_in_executor(None, go.wait, READY_TIMEOUT_S):
                return
            publish = js.publish_async if js is not None else nc.publish
            packb, make, chunk = msgpack.packb, load.make, credit.chunk
            t0 = time.monotonic_ns()
            for i in range(load.events):
                if i % chunk == 0 and not credit.try_take():
                    # Out of credit: wait off the loop, so that nats-py flushes (and acks come).
                    await loop.run_in_executor(None, credit.take)
                await publish(subject, packb(make(i)))
            if js is not None:
                await js.publish_async_completed()
            await nc.flush()
            results.put(("result", tag, {"t0": t0}))
        finally:
            await nc.close()

    asyncio.run(run())


def raw_receiver(results: Any, tag: str, url: str, subject: str, jetstream: bool, load: Load,
                  credit: Credit) -> None:
    """Subscribe to ``subject`` with nats-py, decode and check ``load``; JetStream: an
    ephemeral push consumer (new messages only, each acked) on the stream of ``subject``."""
    import nats

    async def run() -> None:
        nc = await nats.connect(url, allow_reconnect=False)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        received, last_at = 0, time.monotonic()
        unpackb, check, chunk = msgpack.unpackb, load.check, credit.chunk
        js = nc.jetstream() if jetstream else None

        async def on_message(msg: Any) -> None:
            nonlocal received, last_at
            if done.done():
                return
            problem = check(unpackb(msg.data), received)
            if problem:
                done.set_exception(RuntimeError(f"raw receiver: {problem}"))
                return
            if js is not None:
                await msg.ack()
            received += 1
            last_at = time.monotonic()
            if received % chunk == 0:
                credit.give()
            if received == load.events:
                done.set_result(time.monotonic_ns())

        try:
            if js is not None:
                from nats.js.api import ConsumerConfig, DeliverPolicy

                stream = subject.replace(".", "_").upper()
                await js.add_stream(name=stream, subjects=[subject])
                await js.subscribe(subject, stream=stream, cb=on_message, manual_ack=True,
                                   config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, max_ack_pending=-1),
                                   pending_msgs_limit=1 << 20, pending_bytes_limit=1 << 30)
            else:
                await nc.subscribe(subject, cb=on_message, pending_msgs_limit=1 << 20, pending_bytes_limit=1 << 30)
            await nc.flush()
            results.put(("ready", tag, None))
            while not done.done():
                await asyncio.wait([done], timeout=1.0)
                if not done.done() and time.monotonic() - last_at > RECV_STALL_S:
                    raise RuntimeError(f"raw receiver: nothing for {RECV_STALL_S:.0f} s after {received} "
                                       f"of {load.events} values (lost?)")
            results.put(("result", tag, {"t_end": done.result()}))
        finally:
            await nc.close()

    asyncio.run(run())


def _pp_value(i: int) -> dict[str, Any]:
    """Round trip ``i``'s value (the bench's ping-pong value); -1 ends the ponger."""
    return {"seq": i, "price": 1.5}


PP_END = -1


def feed_pinger(results: Any, tag: str, namespace: str, n: int, warmup: int) -> None:
    """Send on feed "ping", wait for the answer on "pong": round trips in ns."""
    _enter_namespace(namespace)
    import shmfeed

    ping: shmfeed.Feed[Any] = shmfeed.Feed("ping")
    pong: shmfeed.Feed[Any] = shmfeed.Feed("pong")
    channel: shmfeed.Channel[Any] = shmfeed.Channel(16)
    subscription = pong.subscribe(channel)
    try:
        samples = []
        for i in range(warmup + n):
            value = _pp_value(i)
            t = time.perf_counter_ns()
            ping.send(value)
            back = channel.recv(RECV_STALL_S)
            dt = time.perf_counter_ns() - t
            if back != value:
                raise RuntimeError(f"ping-pong: sent {value!r}, got back {back!r}")
            if i >= warmup:
                samples.append(dt)
        ping.send(_pp_value(PP_END))
        results.put(("result", tag, samples))
    finally:
        subscription.unsubscribe()
        channel.close()
        ping.detach()
        pong.detach()


def feed_ponger(results: Any, tag: str, namespace: str) -> None:
    """Answer every value of feed "ping" on feed "pong", until None."""
    _enter_namespace(namespace)
    import shmfeed

    ping: shmfeed.Feed[Any] = shmfeed.Feed("ping")
    pong: shmfeed.Feed[Any] = shmfeed.Feed("pong")
    channel: shmfeed.Channel[Any] = shmfeed.Channel(16)
    subscription = ping.subscribe(channel)
    try:
        results.put(("ready", tag, None))
        while True:
            value = channel.recv(CELL_TIMEOUT_S)
            if value["seq"] == PP_END:
                return
            pong.send(value)
    finally:
        subscription.unsubscribe()
        channel.close()
        ping.detach()
        pong.detach()


def raw_pinger(results: Any, tag: str, url: str, prefix: str, n: int, warmup: int) -> None:
    """Raw nats-py: publish on ``<prefix>.ping``, wait for ``<prefix>.pong``."""
    import nats

    async def run() -> None:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            sub = await nc.subscribe(f"{prefix}.pong")
            await nc.flush()
            packb, unpackb = msgpack.packb, msgpack.unpackb
            samples = []
            for i in range(warmup + n):
                value = _pp_value(i)
                t = time.perf_counter_ns()
                await nc.publish(f"{prefix}.ping", packb(value))
                back = unpackb((await sub.next_msg(RECV_STALL_S)).data)
                dt = time.perf_counter_ns() - t
                if back != value:
                    raise RuntimeError(f"raw ping-pong: sent {value!r}, got back {back!r}")
                if i >= warmup:
                    samples.append(dt)
            await nc.publish(f"{prefix}.ping", packb(_pp_value(PP_END)))
            await nc.flush()
            results.put(("result", tag, samples))
        finally:
            await nc.close()

    asyncio.run(run())


def raw_ponger(results: Any, tag: str, url: str, prefix: str) -> None:
    """Raw nats-py: answer every ``<prefix>.ping`` (decoded, encoded again) on ``.pong``."""
    import nats

    async def run() -> None:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            sub = await nc.subscribe(f"{prefix}.ping")
            await nc.flush()
            results.put(("ready", tag, None))
            packb, unpackb = msgpack.packb, msgpack.unpackb
            while True:
                value = unpackb((await sub.next_msg(CELL_TIMEOUT_S)).data)
                if value["seq"] == PP_END:
                    return
                await nc.publish(f"{prefix}.pong", packb(value))
        finally:
            await nc.close()

    asyncio.run(run())


