#!/usr/bin/env python3
"""Side-by-side benchmark: shmfeed vs. other local IPC transports.

    python tools/bench.py [--quick] [--json] [--repeat N] [--events-scale F] [--png FILE] [--transports a,b]
    python tools/bench.py --bridge [--quick] [--json] [--repeat N]   (the NATS bridge: tools/bench_bridge.py)

Throughput: the same lossless fan-out job for every transport. One sender process sends N
values; each of 1, 2 or 4 receiver processes must get every value exactly once, in order
(a sequence number travels in the value; a violation makes the run exit non-zero). Time
runs from the first send until the last receiver got the last value (``time.monotonic_ns``
is system-wide on Linux). CPU is ``time.process_time()`` of the sending process (all its
threads, e.g. mp.Queue's feeder thread) and of each receiver. Every cell runs ``--repeat``
times (default 3) per transport, the transports taking turns, and reports each transport's
median run: on a shared 2-core machine one run can be several times slower than the next
for reasons outside the transport (memory traffic of neighbours), and taking turns gives
every transport the same weather.

Latency: ping-pong between two processes, one channel each way; one-way = round trip / 2.
Run idle (as is) and again with low-priority (nice 19) busy loops, one pinned to each core;
under that load the two ends are pinned to different cores, for every transport alike:
unpinned, the scheduler puts them on one core (a hand-over without a cross-core wake-up,
~5 µs) or on two (~15 µs) at random from run to run, which swamped the differences.

Peers are small ``Transport`` subclasses (see below): to add one, implement ``setup``,
``sender``, ``receiver`` and ``teardown`` (and ``pp_*`` for the latency test), and append it
to ``TRANSPORTS``. Every peer that encodes does msgpack once per value in the sender and once
per receiver, the same work shmfeed does internally.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterator

import msgpack

CTX = mp.get_context("fork")  # fork: fast to start; shmfeed supports it (at-fork hooks)

CELL_TIMEOUT_S = 60.0  # a cell that takes longer is reported as a hang
READY_TIMEOUT_S = 30.0
RECV_STALL_S = 20.0  # peers that can lose messages give up after this long without any


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


class Workload:
    """What one event looks like; ``make(i)`` builds event i, ``check(v, i)`` validates it."""

    def __init__(self, name: str, events: int, capacity: int, buffer_size: int | None, blob: int):
        self.name = name
        self.events = events
        self.capacity = capacity  # per-subscriber bound, the same for every transport
        self.buffer_size = buffer_size  # shmfeed ring bytes (None: shmfeed's default)
        self.blob_len = blob
        self._blob = bytes(blob) if blob else b""

    def make(self, i: int) -> Any:
        if self.blob_len:
            return {"seq": i, "blob": self._blob}
        return {"id": i, "price": 1.5, "sym": "ABCD", "ts": 123456789, "side": "buy"}

    def check(self, v: Any, i: int) -> str | None:
        if not isinstance(v, dict):
            return f"expected a dict, got {type(v).__name__}"
        if self.blob_len:
            if v.get("seq") != i:
                return f"expected seq {i}, got {v.get('seq')!r}"
            blob = v.get("blob")
            if not isinstance(blob, (bytes, bytearray)) or len(blob) != self.blob_len:
                return f"seq {i}: bad blob ({type(blob).__name__}, len {len(blob) if blob is not None else None})"
            return None
        if v.get("id") != i:
            return f"expected id {i}, got {v.get('id')!r}"
        return None

    def encoded_size(self) -> int:
        return len(msgpack.packb(self.make(0)))


def workloads(scale: float) -> list[Workload]:
    def n(x: int) -> int:
        return max(10, int(x * scale))

    return [
        Workload("small", n(150_000), capacity=1024, buffer_size=None, blob=0),
        Workload("4KiB", n(60_000), capacity=256, buffer_size=2 << 20, blob=4096),
        Workload("1MiB", n(2_000), capacity=8, buffer_size=None, blob=1 << 20),
    ]


# --------------------------------------------------------------------------------------
# Transports
# --------------------------------------------------------------------------------------


class Transport:
    """A peer in the comparison.

    Parent process: ``setup(n_subs, workload)`` creates what must be shared (it survives the
    fork into sender and receivers), ``teardown()`` frees it.
    Sender process: ``sender()`` returns ``(send, finish)``; ``send(value)`` delivers one
    value to every subscriber (losslessly), ``finish()`` signals end of stream.
    ``sender_close()`` runs once every receiver has got everything (its CPU is not counted).
    Receiver process i: ``receiver(i)`` returns an iterator over the values, ending at the
    end of stream. It is called before the clock starts (connect/subscribe there).
    Latency: ``pp_setup()`` in the parent, ``pp_endpoint(side)`` in side 0 (pinger) or 1
    (ponger) returns ``(send, recv)``; ``pp_teardown()`` in the parent.
    """

    name = "base"
    note = ""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, ""

    def setup(self, n_subs: int, workload: Workload) -> None:
        raise NotImplementedError

    def sender_ready(self) -> None:
        """In the sender, after ``sender()``: block until every receiver is connected."""

    def sender(self) -> tuple[Callable[[Any], None], Callable[[], None]]:
        raise NotImplementedError

    def sender_close(self) -> None:
        pass

    def receiver(self, i: int) -> Iterator[Any]:
        raise NotImplementedError

    def teardown(self) -> None:
        pass

    def pp_setup(self) -> None:
        raise NotImplementedError

    def pp_endpoint(self, side: int) -> tuple[Callable[[Any], None], Callable[[], Any]]:
        raise NotImplementedError

    def pp_teardown(self) -> None:
        pass


def wait_for_registry(timeout: float = 10.0) -> None:
    """Let the namespace's registry finish starting before anything is timed.

    The first Channel starts it in the background; its start-up (a Python process, about
    0.1 s of CPU) would otherwise land in the first cell measured, on a 2-core machine.
    """
    from shmfeed.testing import registry_pid

    with contextlib.suppress(AssertionError):  # none after all: measure anyway
        registry_pid(timeout=timeout)


class ShmfeedTransport(Transport):
    name = "shmfeed"
    note = "Feed() -> one Channel per subscriber (overflow=block)"

    def setup(self, n_subs: int, workload: Workload) -> None:
        import shmfeed

        self.n_subs = n_subs
        self.feed = shmfeed.Feed()
        self.channels = [
            shmfeed.Channel(capacity=workload.capacity, buffer_size=workload.buffer_size) for _ in range(n_subs)
        ]
        self.subs = [self.feed.subscribe(ch) for ch in self.channels]
        wait_for_registry()

    def sender(self):
        feed, n_subs = self.feed, self.n_subs
        fsend = feed.send

        def send(value: Any) -> None:
            got = fsend(value)
            if got != n_subs:
                raise RuntimeError(f"feed.send delivered to {got} channels, expected {n_subs}")

        def finish() -> None:
            for ch in self.channels:
                ch.close()

        return send, finish

    def receiver(self, i: int) -> Iterator[Any]:
        return iter(self.channels[i])

    def teardown(self) -> None:
        for sub in self.subs:
            sub.unsubscribe()
        for ch in self.channels:
            ch.close()
        self.feed.close()
        del self.subs, self.channels, self.feed

    def pp_setup(self) -> None:
        import shmfeed

        self.pp = [shmfeed.Channel(capacity=16), shmfeed.Channel(capacity=16)]

    def pp_endpoint(self, side: int):
        out, inp = (self.pp[0], self.pp[1]) if side == 0 else (self.pp[1], self.pp[0])
        return out.send, inp.recv

    def pp_teardown(self) -> None:
        for ch in self.pp:
            ch.close()
        del self.pp


class MPQueueTransport(Transport):
    name = "mp.Queue"
    note = "one multiprocessing.Queue(maxsize=capacity) per subscriber; msgpack bytes"

    def setup(self, n_subs: int, workload: Workload) -> None:
        self.queues = [CTX.Queue(maxsize=workload.capacity) for _ in range(n_subs)]

    def sender(self):
        queues = self.queues
        packb = msgpack.packb

        def send(value: Any) -> None:
            data = packb(value)
            for q in queues:
                q.put(data)

        def finish() -> None:
            for q in queues:
                q.put(None)
            for q in queues:
                q.close()
                q.join_thread()  # the feeder thread has written everything

        return send, finish

    def receiver(self, i: int) -> Iterator[Any]:
        q = self.queues[i]
        unpackb = msgpack.unpackb
        get = q.get
        while True:
            data = get()
            if data is None:
                return
            yield unpackb(data)

    def teardown(self) -> None:
        for q in self.queues:
            q.close()
        del self.queues

    def pp_setup(self) -> None:
        self.pp = [CTX.Queue(maxsize=16), CTX.Queue(maxsize=16)]

    def pp_endpoint(self, side: int):
        out, inp = (self.pp[0], self.pp[1]) if side == 0 else (self.pp[1], self.pp[0])
        packb, unpackb = msgpack.packb, msgpack.unpackb
        return (lambda v: out.put(packb(v))), (lambda: unpackb(inp.get()))

    def pp_teardown(self) -> None:
        for q in self.pp:
            q.close()
        del self.pp


class ZmqTransport(Transport):
    name = "zmq"
    note = "pyzmq XPUB/SUB over ipc:// (XPUB_NODROP=1, SNDHWM=1000); latency: PAIR; msgpack"
    END = b""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import zmq  # noqa: F401
        except ImportError:
            return False, "pyzmq not installed (import zmq failed): skipped"
        return True, ""

    def _addr(self, tag: str) -> str:
        return f"ipc://{tempfile.gettempdir()}/shmfeed-bench-{os.getpid()}-{tag}-{id(self):x}.ipc"

    def setup(self, n_subs: int, workload: Workload) -> None:
        self.n_subs = n_subs
        self.addr = self._addr("pub")

    def sender(self):
        import zmq

        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.bind(self.addr)
        self.sock = sock
        packb = msgpack.packb
        zsend = sock.send

        def send(value: Any) -> None:
            zsend(packb(value))

        def finish() -> None:
            sock.send(self.END)

        return send, finish

    def sender_close(self) -> None:
        # Not in finish(): closing (even with linger=-1) right after the last send lost the
        # tail of the stream for some subscribers (libzmq 4.3.5, XPUB_NODROP, 4 SUBs).
        self.sock.close(linger=-1)
        self.ctx.term()

    def sender_ready(self) -> None:
        subscribed = 0
        while subscribed < self.n_subs:  # XPUB receives one b"\x01" per subscriber
            msg = self.sock.recv()
            if msg[:1] == b"\x01":
                subscribed += 1

    def receiver(self, i: int) -> Iterator[Any]:
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.RCVTIMEO, int(RECV_STALL_S * 1000))
        sock.connect(self.addr)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        unpackb = msgpack.unpackb

        def gen() -> Iterator[Any]:
            try:
                while True:
                    try:
                        data = sock.recv()
                    except zmq.Again:
                        raise RuntimeError(f"zmq receiver {i}: nothing for {RECV_STALL_S:.0f} s (lost messages?)") from None
                    if data == self.END:
                        return
                    yield unpackb(data)
            finally:
                sock.close(linger=0)
                ctx.term()

        return gen()

    def teardown(self) -> None:
        try:
            os.unlink(self.addr[len("ipc://") :])
        except OSError:
            pass

    def pp_setup(self) -> None:
        self.pp_addr = self._addr("pair")

    def pp_endpoint(self, side: int):
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        if side == 0:
            sock.bind(self.pp_addr)
        else:
            sock.connect(self.pp_addr)
        packb, unpackb = msgpack.packb, msgpack.unpackb
        return (lambda v: sock.send(packb(v))), (lambda: unpackb(sock.recv()))

    def pp_teardown(self) -> None:
        try:
            os.unlink(self.pp_addr[len("ipc://") :])
        except OSError:
            pass


class PipeTransport(Transport):
    name = "mp.Pipe"
    note = "one multiprocessing.Pipe(duplex=False) per subscriber; send_bytes of msgpack bytes (bound: the OS pipe buffer, not capacity)"

    def setup(self, n_subs: int, workload: Workload) -> None:
        self.pipes = [CTX.Pipe(duplex=False) for _ in range(n_subs)]  # (reader, writer)

    def sender(self):
        writers = [w for _, w in self.pipes]
        sends = [w.send_bytes for w in writers]
        packb = msgpack.packb

        def send(value: Any) -> None:
            data = packb(value)
            for s in sends:
                s(data)

        def finish() -> None:
            for s in sends:
                s(b"")  # msgpack output is never empty

        return send, finish

    def receiver(self, i: int) -> Iterator[Any]:
        recv = self.pipes[i][0].recv_bytes
        unpackb = msgpack.unpackb
        while True:
            data = recv()
            if not data:
                return
            yield unpackb(data)

    def teardown(self) -> None:
        for r, w in self.pipes:
            r.close()
            w.close()
        del self.pipes

    def pp_setup(self) -> None:
        self.pp = [CTX.Pipe(duplex=False), CTX.Pipe(duplex=False)]

    def pp_endpoint(self, side: int):
        out, inp = (self.pp[0][1], self.pp[1][0]) if side == 0 else (self.pp[1][1], self.pp[0][0])
        packb, unpackb = msgpack.packb, msgpack.unpackb
        return (lambda v: out.send_bytes(packb(v))), (lambda: unpackb(inp.recv_bytes()))

    def pp_teardown(self) -> None:
        for r, w in self.pp:
            r.close()
            w.close()
        del self.pp


class FasterFifoTransport(Transport):
    name = "faster-fifo"
    note = ("one faster_fifo.Queue per subscriber, max_size_bytes = capacity x (record + 8); "
            "per-event put/get of msgpack bytes (identity dumps/loads: no pickle)")
    BLOCK_S = CELL_TIMEOUT_S  # put/get raise Full/Empty after this long instead of losing data

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import faster_fifo  # noqa: F401
        except ImportError:
            return False, "faster-fifo not installed (import faster_fifo failed): skipped"
        return True, ""

    @staticmethod
    def _queue(max_bytes: int):
        import faster_fifo

        return faster_fifo.Queue(max_size_bytes=max_bytes, loads=lambda b: b, dumps=lambda b: b)

    def setup(self, n_subs: int, workload: Workload) -> None:
        size = workload.capacity * (workload.encoded_size() + 8)
        self.queues = [self._queue(size) for _ in range(n_subs)]

    def sender(self):
        puts = [q.put for q in self.queues]
        packb = msgpack.packb
        t = self.BLOCK_S

        def send(value: Any) -> None:
            data = packb(value)
            for put in puts:
                put(data, True, t)

        def finish() -> None:
            for put in puts:
                put(b"", True, t)

        return send, finish

    def receiver(self, i: int) -> Iterator[Any]:
        get = self.queues[i].get
        unpackb = msgpack.unpackb
        t = self.BLOCK_S
        while True:
            data = get(True, t)  # a memoryview into the queue's read buffer
            if not len(data):
                return
            yield unpackb(data)

    def teardown(self) -> None:
        for q in self.queues:
            q.close()
        del self.queues

    def pp_setup(self) -> None:
        self.pp = [self._queue(1 << 16), self._queue(1 << 16)]

    def pp_endpoint(self, side: int):
        out, inp = (self.pp[0], self.pp[1]) if side == 0 else (self.pp[1], self.pp[0])
        packb, unpackb = msgpack.packb, msgpack.unpackb
        t = self.BLOCK_S
        return (lambda v: out.put(packb(v), True, t)), (lambda: unpackb(inp.get(True, t)))

    def pp_teardown(self) -> None:
        for q in self.pp:
            q.close()
        del self.pp


class Iceoryx2Transport(Transport):
    name = "iceoryx2"
    note = ("iceoryx2 pub/sub, Slice[c_uint8] of msgpack bytes; lossless: safe overflow off, "
            "subscriber_max_buffer_size = capacity, publisher RetryUntilDelivered, publisher created "
            "before the subscribers (else 0.10.0 lost samples), send() must reach every subscriber; "
            "receivers poll receive() and yield (sleep(0)) when empty; latency: two services")
    lossless = True

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            os.environ.setdefault("IOX2_LOG_LEVEL", "ERROR")
            import iceoryx2  # noqa: F401
        except ImportError:
            return False, "iceoryx2 not installed (import iceoryx2 failed): skipped"
        return True, ""

    def _name(self, tag: str) -> str:
        return f"shmfeed-bench-{os.getpid()}-{tag}-{id(self):x}"

    def setup(self, n_subs: int, workload: Workload) -> None:
        self.n_subs = n_subs
        self.capacity = workload.capacity
        self.max_len = workload.encoded_size() + 64
        self.svc_name = self._name("pub")

    @staticmethod
    def _node():
        import iceoryx2 as iox2

        iox2.set_log_level(iox2.LogLevel.Error)
        return iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)

    def _service(self, node, name: str, capacity: int, max_subs: int):
        import ctypes

        import iceoryx2 as iox2

        return (
            node.service_builder(iox2.ServiceName.new(name))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .enable_safe_overflow(False)
            .subscriber_max_buffer_size(capacity)
            .subscriber_max_borrowed_samples(2)
            .history_size(0)
            .max_subscribers(max_subs)
            .max_publishers(1)
            .open_or_create()
        )

    def _publisher(self, service, max_len: int):
        import iceoryx2 as iox2

        return (
            service.publisher_builder()
            .initial_max_slice_len(max_len)
            .allocation_strategy(iox2.AllocationStrategy.PowerOfTwo)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )

    @staticmethod
    def _sendfn(pub, expect: int):
        import ctypes

        loan, memmove = pub.loan_slice_uninit, ctypes.memmove

        def send_bytes(data: bytes) -> None:
            n = len(data)
            sample = loan(n if n else 1)
            if n:
                memmove(sample.payload().as_ptr(), data, n)
            else:
                sample.payload()[0] = 0xC1  # never a valid msgpack first byte: end of stream
            got = sample.assume_init().send()
            if got != expect:
                raise RuntimeError(f"iceoryx2 send() reached {got} of {expect} subscribers (sample lost)")

        return send_bytes

    @staticmethod
    def _recvfn(sub):
        from ctypes import string_at

        receive, sleep = sub.receive, time.sleep
        unpackb = msgpack.unpackb

        def recv_raw(decode):
            while True:
                sample = receive()
                if sample is not None:
                    break
                sleep(0)
            payload = sample.payload()
            data = string_at(payload.as_ptr(), payload.len())  # one copy, like a pipe's recv_bytes
            sample.delete()
            return None if data == b"\xc1" else decode(data)

        return recv_raw, unpackb

    def sender(self):
        self.node = self._node()
        self.service = self._service(self.node, self.svc_name, self.capacity, self.n_subs)
        self.pub = self._publisher(self.service, self.max_len)
        send_bytes = self._sendfn(self.pub, self.n_subs)
        packb = msgpack.packb

        def send(value: Any) -> None:
            send_bytes(packb(value))

        def finish() -> None:
            send_bytes(b"")

        return send, finish

    def sender_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.service.dynamic_config.number_of_subscribers < self.n_subs:
            if time.monotonic() > deadline:
                raise RuntimeError("iceoryx2: subscribers did not connect")
            time.sleep(0.001)
        self.pub.update_connections()

    def sender_close(self) -> None:
        self.pub.delete()
        del self.pub, self.service, self.node

    def _subscriber(self, node, name: str, capacity: int, max_subs: int):
        service = self._service(node, name, capacity, max_subs)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while service.dynamic_config.number_of_publishers < 1:  # see note: publisher first
            if time.monotonic() > deadline:
                raise RuntimeError("iceoryx2: no publisher")
            time.sleep(0.001)
        return service, service.subscriber_builder().buffer_size(capacity).create()

    @staticmethod
    def _drop_at_exit(keep: list) -> None:
        # Workers leave through os._exit: drop the iceoryx2 ports and node (Rust Drop removes
        # their files) in multiprocessing's exit hook.
        mp.util.Finalize(None, keep.clear, exitpriority=100)

    def receiver(self, i: int) -> Iterator[Any]:
        node = self._node()
        service, sub = self._subscriber(node, self.svc_name, self.capacity, self.n_subs)
        keep = [sub, service, node]
        self._drop_at_exit(keep)
        recv_raw, unpackb = self._recvfn(sub)
        del node, service, sub

        def gen() -> Iterator[Any]:
            while True:
                v = recv_raw(unpackb)
                if v is None:
                    return
                yield v

        return gen()

    def pp_setup(self) -> None:
        self.pp_names = (self._name("ping"), self._name("pong"))

    def pp_endpoint(self, side: int):
        node = self._node()
        out_name, in_name = self.pp_names if side == 0 else self.pp_names[::-1]
        out_svc = self._service(node, out_name, 16, 1)
        pub = self._publisher(out_svc, 256)
        in_svc, sub = self._subscriber(node, in_name, 16, 1)
        while out_svc.dynamic_config.number_of_subscribers < 1:
            time.sleep(0.001)
        pub.update_connections()
        self._drop_at_exit([pub, sub, out_svc, in_svc, node])
        send_bytes = self._sendfn(pub, 1)
        recv_raw, unpackb = self._recvfn(sub)
        packb = msgpack.packb
        return (lambda v: send_bytes(packb(v))), (lambda: recv_raw(unpackb))


class PlainRingTransport(Transport):
    name = "plain ring"
    note = ("FLOOR, not a peer: tools/plain_ring.py, one posix_ipc SPSC ring (shm + 2 semaphores, "
            "capacity slots) per subscriber; the sender writes the msgpack bytes into each")
    floor = True

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            _plain_ring()
        except ImportError as exc:
            return False, f"tools/plain_ring.py not importable ({exc}): skipped"
        return True, ""

    def setup(self, n_subs: int, workload: Workload) -> None:
        PlainRing = _plain_ring()
        self.rings = [PlainRing(workload.capacity, workload.encoded_size() + 64) for _ in range(n_subs)]

    def sender(self):
        puts = [r.put for r in self.rings]
        packb = msgpack.packb

        def send(value: Any) -> None:
            data = packb(value)
            for put in puts:
                put(data)

        def finish() -> None:
            for r in self.rings:
                r.put_end()

        return send, finish

    def receiver(self, i: int) -> Iterator[Any]:
        get = self.rings[i].get
        unpackb = msgpack.unpackb
        while True:
            v = get(unpackb)
            if v is None:
                return
            yield v

    def teardown(self) -> None:
        for r in self.rings:
            r.close()
            r.unlink()
        del self.rings

    def pp_setup(self) -> None:
        PlainRing = _plain_ring()
        self.pp = [PlainRing(16, 256), PlainRing(16, 256)]

    def pp_endpoint(self, side: int):
        out, inp = (self.pp[0], self.pp[1]) if side == 0 else (self.pp[1], self.pp[0])
        packb, unpackb = msgpack.packb, msgpack.unpackb
        return (lambda v: out.put(packb(v))), (lambda: inp.get(unpackb))

    def pp_teardown(self) -> None:
        for r in self.pp:
            r.close()
            r.unlink()
        del self.pp


class BareSlotTransport(Transport):
    """The latency floor (ping-pong only): per direction one shared-memory slot and one
    posix_ipc semaphore; a hop is a msgpack encode, a copy into the slot, one post, one
    wait, a copy out and a decode. Nothing cheaper can carry the same value between two
    processes through a kernel wake-up."""

    name = "bare slot"
    note = ("FLOOR for latency, not a peer: one shm slot and one posix_ipc semaphore per direction, "
            "msgpack of the same small dict (ping-pong only)")
    floor = True
    throughput = False
    SLOT = 4096

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import posix_ipc  # noqa: F401
        except ImportError as exc:
            return False, f"posix_ipc missing ({exc}): skipped"
        return True, ""

    def pp_setup(self) -> None:
        import mmap

        import posix_ipc

        tag = f"/bench-bare-{os.getpid()}-{time.monotonic_ns()}"
        self.names = [f"{tag}-m", f"{tag}-s0", f"{tag}-s1"]
        memory = posix_ipc.SharedMemory(self.names[0], posix_ipc.O_CREX, size=2 * self.SLOT)
        self.mapping = mmap.mmap(memory.fd, 2 * self.SLOT)
        memory.close_fd()
        self.semaphores = [posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=0) for name in self.names[1:]]

    def pp_endpoint(self, side: int):
        mapping, slot = self.mapping, self.SLOT
        out_at, in_at = (0, slot) if side == 0 else (slot, 0)
        post, wait = (self.semaphores[0].release, self.semaphores[1].acquire) if side == 0 else \
            (self.semaphores[1].release, self.semaphores[0].acquire)
        packb, unpackb, view = msgpack.packb, msgpack.unpackb, memoryview(mapping)

        def send(value: Any) -> None:
            data = packb(value)
            view[out_at:out_at + 4] = len(data).to_bytes(4, "little")
            view[out_at + 4:out_at + 4 + len(data)] = data
            post()

        def recv() -> Any:
            wait()
            size = int.from_bytes(view[in_at:in_at + 4], "little")
            return unpackb(view[in_at + 4:in_at + 4 + size])

        return send, recv

    def pp_teardown(self) -> None:
        import posix_ipc

        self.mapping.close()
        for semaphore in self.semaphores:
            semaphore.close()
        for unlink, name in [(posix_ipc.unlink_shared_memory, self.names[0])] + \
                [(posix_ipc.unlink_semaphore, name) for name in self.names[1:]]:
            with contextlib.suppress(posix_ipc.ExistentialError):
                unlink(name)


def _plain_ring():
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from plain_ring import PlainRing

    return PlainRing


TRANSPORTS: list[type[Transport]] = [
    ShmfeedTransport,
    MPQueueTransport,
    PipeTransport,
    ZmqTransport,
    FasterFifoTransport,
    Iceoryx2Transport,
    PlainRingTransport,
    BareSlotTransport,
]
BASELINE = "shmfeed"


# --------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------


def _sender_main(transport: Transport, wl: Workload, results, go, done) -> None:
    try:
        send, finish = transport.sender()
        transport.sender_ready()
        results.put(("ready", "tx", 0, None))
        if not go.wait(READY_TIMEOUT_S * 2):
            return
        make = wl.make
        n = wl.events
        cpu0 = time.process_time()
        t0 = time.monotonic_ns()
        for i in range(n):
            send(make(i))
        t_sent = time.monotonic_ns()
        finish()
        results.put(("result", "tx", 0, {"t0": t0, "t_sent": t_sent}))
        done.wait(CELL_TIMEOUT_S)  # every receiver has everything: the sender's work is over
        cpu1 = time.process_time()
        results.put(("cpu", "tx", 0, cpu1 - cpu0))
        transport.sender_close()
    except BaseException:  # noqa: BLE001
        results.put(("error", "tx", 0, traceback.format_exc()))


def _receiver_main(transport: Transport, i: int, wl: Workload, results) -> None:
    try:
        it = transport.receiver(i)
        check = wl.check
        expected = 0
        error = None
        t_last = 0
        results.put(("ready", "rx", i, None))
        cpu0 = time.process_time()
        for v in it:
            if error is None:
                problem = check(v, expected)
                if problem:
                    error = f"receiver {i}: {problem}"
            expected += 1
            if expected == wl.events:
                t_last = time.monotonic_ns()
        cpu1 = time.process_time()
        if error is None and expected != wl.events:
            error = f"receiver {i}: got {expected} events, expected {wl.events}"
        results.put(("result", "rx", i, {"count": expected, "t_end": t_last, "cpu": cpu1 - cpu0, "error": error}))
    except BaseException:  # noqa: BLE001
        results.put(("error", "rx", i, traceback.format_exc()))


def _pp_main(transport: Transport, side: int, n: int, warmup: int, results, pin: bool) -> None:
    try:
        if pin:
            _pin(side)
        send, recv = transport.pp_endpoint(side)
        if side == 1:
            while True:
                v = recv()
                send(v)
                if v is None:
                    return
        samples = []
        for i in range(warmup + n):
            v = {"seq": i, "price": 1.5}
            t = time.perf_counter_ns()
            send(v)
            back = recv()
            dt = time.perf_counter_ns() - t
            if back != v:
                raise RuntimeError(f"ping-pong: sent {v!r}, got back {back!r}")
            if i >= warmup:
                samples.append(dt)
        send(None)
        recv()
        results.put(("result", "pp", 0, samples))
    except BaseException:  # noqa: BLE001
        results.put(("error", "pp", side, traceback.format_exc()))


def _pin(index: int) -> None:
    """Run on CPU ``index`` (modulo the CPUs we may use): the two ends of a ping-pong on
    two different CPUs every time, so that each transport is measured in the same regime
    (two ends sharing a CPU hand over without an inter-processor wake-up, and the
    scheduler picks one or the other at random from run to run)."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[index % len(cpus)]})


def _spin(index: int) -> None:
    _pin(index)
    os.nice(19)
    while True:
        pass


# --------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------

_children: list[mp.process.BaseProcess] = []


def _start(target, *args) -> mp.process.BaseProcess:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    _children.append(p)
    return p


def _stop_all_children() -> None:
    for p in _children:
        if p.is_alive():
            p.terminate()
    for p in _children:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
    _children.clear()


def _collect(results, want: int, deadline: float) -> list[tuple]:
    out = []
    while len(out) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            out.append(results.get(timeout=min(left, 1.0)))
        except queue_mod.Empty:
            continue
    return out


def _finish(procs: list, results: Any, teardown: Callable[[], None], record: dict) -> None:
    """Join (or terminate) a measurement's processes, then tear its transport down."""
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p in _children:
            _children.remove(p)
    results.close()
    try:
        teardown()
    except Exception as exc:  # noqa: BLE001
        record.setdefault("error", f"teardown: {exc!r}")


def run_cell(tcls: type[Transport], wl: Workload, n_subs: int) -> dict:
    transport = tcls()
    transport.setup(n_subs, wl)
    results = CTX.Queue()
    go, done = CTX.Event(), CTX.Event()
    procs = []
    cell: dict[str, Any] = {"transport": tcls.name, "workload": wl.name, "subs": n_subs, "events": wl.events}
    try:
        procs = [_start(_receiver_main, transport, i, wl, results) for i in range(n_subs)]
        procs.append(_start(_sender_main, transport, wl, results, go, done))
        ready = _collect(results, n_subs + 1, time.monotonic() + READY_TIMEOUT_S)
        errors = [m[3] for m in ready if m[0] == "error"]
        if errors or len(ready) < n_subs + 1:
            cell["error"] = "; ".join(errors) or f"only {len(ready)} of {n_subs + 1} processes became ready"
            return cell
        go.set()
        msgs = _collect(results, n_subs + 1, time.monotonic() + CELL_TIMEOUT_S)
        done.set()
        cpu_msg = _collect(results, 1, time.monotonic() + 10.0)
        msgs += [m for m in cpu_msg if m[0] == "error"]
        errors = [f"{m[1]}{m[2]}: {m[3]}" for m in msgs if m[0] == "error"]
        errors += [m[3]["error"] for m in msgs if m[0] == "result" and m[1] == "rx" and m[3]["error"]]
        if len(msgs) < n_subs + 1:
            finished = {(m[1], m[2]) for m in msgs}
            missing = [f"{r}{i}" for r, i in [("tx", 0)] + [("rx", i) for i in range(n_subs)] if (r, i) not in finished]
            errors.append(f"HANG: {', '.join(missing)} did not finish within {CELL_TIMEOUT_S:.0f} s")
        elif not cpu_msg or cpu_msg[0][0] != "cpu":
            errors.append("sender did not report its CPU time")
        if errors:
            cell["error"] = "; ".join(errors)
            return cell
        tx = dict(next(m[3] for m in msgs if m[1] == "tx"), cpu=cpu_msg[0][3])
        rxs = [m[3] for m in msgs if m[1] == "rx"]
        elapsed = (max(r["t_end"] for r in rxs) - tx["t0"]) / 1e9
        cell.update(
            seconds=elapsed,
            events_per_s=wl.events / elapsed,
            mb_per_s=wl.events * wl.encoded_size() / elapsed / 1e6,
            tx_cpu_us_per_event=tx["cpu"] / wl.events * 1e6,
            rx_cpu_us_per_event=statistics.mean(r["cpu"] for r in rxs) / wl.events * 1e6,  # mean per receiver
            rx_counts=[r["count"] for r in rxs],
        )
        return cell
    finally:
        done.set()
        _finish(procs, results, transport.teardown, cell)
        del transport
        gc.collect()


def median_cell(runs: list[dict]) -> dict:
    """One transport's result for a cell from its repeated runs: the run of median
    throughput (the lower middle one for an even count), or the first failed run, since a
    single loss or hang fails the cell. Every run's events/s is kept in ``runs_events_per_s``."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda run: run["events_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["runs_events_per_s"] = [run["events_per_s"] for run in runs]
    return chosen


def run_pingpong(tcls: type[Transport], n: int, load: str) -> dict:
    transport = tcls()
    transport.pp_setup()
    results = CTX.Queue()
    out: dict[str, Any] = {"transport": tcls.name, "load": load, "round_trips": n}
    procs = []
    try:
        pin = load != "idle"  # idle: as is; busy: each end on its own CPU (see _pin)
        procs = [_start(_pp_main, transport, 1, n, 0, results, pin),
                 _start(_pp_main, transport, 0, n, 200, results, pin)]
        msgs = _collect(results, 1, time.monotonic() + CELL_TIMEOUT_S)
        if not msgs:
            out["error"] = "HANG: ping-pong did not finish"
            return out
        if msgs[0][0] == "error":
            out["error"] = msgs[0][3]
            return out
        samples = sorted(msgs[0][3])

        def pct(q: float) -> float:
            return samples[min(len(samples) - 1, int(q * len(samples)))] / 2 / 1000  # one-way µs

        out.update(p50_us=pct(0.50), p99_us=pct(0.99), p999_us=pct(0.999), max_us=samples[-1] / 2 / 1000)
        return out
    finally:
        _finish(procs, results, transport.pp_teardown, out)
        del transport
        gc.collect()


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def _cell_keys(cells: list[dict]) -> list[tuple[str, int]]:
    keys: list[tuple[str, int]] = []
    for c in cells:
        k = (c["workload"], c["subs"])
        if k not in keys:
            keys.append(k)
    return keys


def summarize(doc: dict) -> list[dict]:
    """Per cell: shmfeed vs. the fastest lossless peer (the floor is not a peer) and vs. the floor."""
    kinds = doc["meta"]["kinds"]
    out = []
    cells = doc["throughput"]
    for k in _cell_keys(cells):
        group = [c for c in cells if (c["workload"], c["subs"]) == k and "error" not in c]
        base = next((c for c in group if c["transport"] == BASELINE), None)
        peers = [c for c in group if kinds.get(c["transport"]) == "peer"]
        best = max(peers, key=lambda c: c["events_per_s"], default=None)
        floor = next((c for c in group if kinds.get(c["transport"]) == "floor"), None)
        row: dict[str, Any] = {"workload": k[0], "subs": k[1]}
        if base is not None and best is not None:
            row.update(best_peer=best["transport"], shmfeed_vs_best_peer=base["events_per_s"] / best["events_per_s"])
        if base is not None and floor is not None:
            row.update(shmfeed_vs_floor=base["events_per_s"] / floor["events_per_s"])
        out.append(row)
    return out


def print_tables(doc: dict) -> None:
    m = doc["meta"]
    print(
        f"shmfeed bench  python {m['python']}  {m['cpus']} CPUs  start={m['start_method']}  "
        f"namespace={m['namespace']}  scale={m['events_scale']}"
    )
    for name, note in m["transports"].items():
        print(f"  {name:11s} {note}")
    print()
    print("Throughput: lossless fan-out, 1 sender -> N receiver processes, every event checked in order.")
    print(f"  Each cell: the median of {m.get('repeat', 1)} runs per transport, interleaved (this machine is shared and noisy).")
    print("  CPU µs/ev: tx = sender process, rx = mean per receiver process.")
    print("  vs shmfeed = shmfeed ev/s / this ev/s (> 1: shmfeed is faster). (floor) = not a peer, see notes.")
    hdr = (f"{'workload':8s} {'subs':>4s} {'events':>7s}  {'transport':18s} {'events/s':>12s} {'MB/s':>8s} "
           f"{'tx µs/ev':>9s} {'rx µs/ev':>9s} {'vs shmfeed':>10s}")
    print(hdr)
    print("-" * len(hdr))
    cells = doc["throughput"]
    summaries = {(r["workload"], r["subs"]): r for r in doc.get("summary", [])}
    for k in _cell_keys(cells):
        group = [c for c in cells if (c["workload"], c["subs"]) == k]
        base = next((c for c in group if c["transport"] == BASELINE and "error" not in c), None)
        for c in group:
            lead = f"{c['workload']:8s} {c['subs']:>4d} {c['events']:>7d}"
            label = c["transport"] + (" (floor)" if m["kinds"].get(c["transport"]) == "floor" else "")
            if "error" in c:
                print(f"{lead}  {label:18s} ERROR: {c['error'].strip().splitlines()[-1][:100]}")
                continue
            ratio = "" if base is None or c is base else f"{base['events_per_s'] / c['events_per_s']:.2f}x"
            print(
                f"{lead}  {label:18s} {_fmt_rate(c['events_per_s']):>12s} {c['mb_per_s']:>8.1f} "
                f"{c['tx_cpu_us_per_event']:>9.1f} {c['rx_cpu_us_per_event']:>9.1f} {ratio:>10s}"
            )
        r = summaries.get(k, {})
        parts = []
        if "shmfeed_vs_best_peer" in r:
            parts.append(f"shmfeed / best peer ({r['best_peer']}) = {r['shmfeed_vs_best_peer']:.2f}x")
        if "shmfeed_vs_floor" in r:
            parts.append(f"shmfeed / plain ring floor = {r['shmfeed_vs_floor']:.2f}x")
        if parts:
            print(f"{'':22s}" + ";  ".join(parts))
        print()
    print("Latency: ping-pong, small value, one-way = round trip / 2 (µs)")
    hdr = f"{'transport':11s} {'load':22s} {'p50':>8s} {'p99':>8s} {'p99.9':>8s} {'max':>9s}"
    print(hdr)
    print("-" * len(hdr))
    for r in doc["latency"]:
        if "error" in r:
            print(f"{r['transport']:11s} {r['load']:22s} ERROR: {r['error'].strip().splitlines()[-1][:100]}")
            continue
        print(
            f"{r['transport']:11s} {r['load']:22s} {r['p50_us']:>8.1f} {r['p99_us']:>8.1f} {r['p999_us']:>8.1f} {r['max_us']:>9.1f}"
        )
    if doc["notes"]:
        print()
        for note in doc["notes"]:
            print(f"note: {note}")
    print()
    print(f"total {doc['meta']['wall_seconds']:.1f} s; result: {'OK' if doc['ok'] else 'FAILED'}")


def draw_png(doc: dict, path: str) -> str | None:
    """Grouped bars (log scale) of events/s per transport per cell; returns a note on failure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--png {path}: matplotlib not installed: no chart"
    cells = [c for c in doc["throughput"] if "error" not in c]
    keys = _cell_keys(doc["throughput"])
    names = list(doc["meta"]["transports"])
    if not cells or not keys:
        return f"--png {path}: no results to draw"
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(min(16.0, max(8.0, 0.25 * len(keys) * len(names) + 2)), 6))
    for j, name in enumerate(names):
        xs, ys = [], []
        for x, k in enumerate(keys):
            c = next((c for c in cells if (c["workload"], c["subs"]) == k and c["transport"] == name), None)
            if c is not None:
                xs.append(x - 0.4 + width * (j + 0.5))
                ys.append(c["events_per_s"])
        kind = doc["meta"]["kinds"].get(name)
        label = name + (" (floor)" if kind == "floor" else "")
        ax.bar(xs, ys, width, label=label, hatch="//" if kind == "floor" else None,
               edgecolor="black" if name == BASELINE else None, linewidth=1.2 if name == BASELINE else 0)
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{w}\nx{n}" for w, n in keys])
    ax.set_ylabel("events/s (log)")
    ax.set_title("Lossless fan-out, 1 sender -> N receivers (msgpack, in-order checked)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _monitor_loop(namespace: str, interval: float) -> None:
    """What `shmfeed monitor --interval S` does each refresh: snapshot, rates, render."""
    from shmfeed import _monitor

    previous = None
    while True:
        previous = _monitor.collect(namespace, previous)
        _monitor.render_text(previous)
        time.sleep(interval)


def run_monitor_cost(scale: float, rounds: int = 3) -> dict:
    """Small-event fan-out to 4 subscribers, alternately without and with a monitor."""
    wl = next(w for w in workloads(scale) if w.name == "small")
    rates: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(rounds):
        for mode in ("without", "with"):
            watcher = _start(_monitor_loop, os.environ["SHMFEED_NAMESPACE"], 0.5) if mode == "with" else None
            try:
                cell = run_cell(ShmfeedTransport, wl, 4)
            finally:
                if watcher is not None:
                    watcher.terminate()
                    watcher.join(5)
                    _children.remove(watcher)
            if "error" in cell:
                return {"error": cell["error"]}
            rates[mode].append(cell["events_per_s"])
    without, with_ = statistics.median(rates["without"]), statistics.median(rates["with"])
    return {"without_ev_s": rates["without"], "with_ev_s": rates["with"],
            "slowdown_pct": round(100 * (without - with_) / without, 1)}


def _kind(tcls: type[Transport]) -> str:
    if tcls.name == BASELINE:
        return "baseline"
    if getattr(tcls, "floor", False):
        return "floor"
    return "peer" if getattr(tcls, "lossless", True) else "lossy peer"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="divide event counts by 10")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    ap.add_argument("--events-scale", type=float, default=1.0, help="multiply event counts by F")
    ap.add_argument("--subs", default="1,2,4", help="subscriber counts (default 1,2,4)")
    ap.add_argument("--only", default="", help="comma-separated workloads to run (default all)")
    ap.add_argument("--transports", default="", help="comma-separated transport names to run (default all; shmfeed always)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of every throughput cell, interleaved across transports; the median is reported (default 3)")
    ap.add_argument("--png", metavar="FILE", default="", help="also draw the throughput results as a bar chart (needs matplotlib)")
    ap.add_argument("--monitor-cost", action="store_true",
                    help="only measure small-event fan-out to 4 subscribers with and without a monitor refreshing every 0.5 s")
    ap.add_argument("--bridge", action="store_true",
                    help="only the NATS bridge vs raw nats-py (tools/bench_bridge.py; honours --quick, --json, --repeat)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.bridge:  # its own namespaces, servers and processes: nothing below applies
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_bridge

        return bench_bridge.main(quick=args.quick, as_json=args.json, repeat=args.repeat, scale=args.events_scale)

    namespace = f"bench-{os.getpid()}"
    os.environ["SHMFEED_NAMESPACE"] = namespace  # before anything of shmfeed is created
    import shmfeed  # noqa: F401
    from shmfeed import _gc

    started = time.monotonic()
    scale = args.events_scale * (0.1 if args.quick else 1.0)
    sub_counts = [int(s) for s in args.subs.split(",") if s]
    notes: list[str] = []
    transports: list[type[Transport]] = []
    wanted = {t.strip() for t in args.transports.split(",") if t.strip()}
    for tcls in TRANSPORTS:
        if wanted and tcls.name not in wanted and tcls.name != BASELINE:
            continue
        ok, why = tcls.available()
        if ok:
            transports.append(tcls)
        else:
            notes.append(f"{tcls.name}: {why}")

    doc: dict[str, Any] = {
        "meta": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "start_method": CTX.get_start_method(),
            "namespace": namespace,
            "events_scale": scale,
            "repeat": args.repeat,
            "transports": {t.name: t.note for t in transports},
            "kinds": {t.name: _kind(t) for t in transports},
        },
        "throughput": [],
        "latency": [],
        "notes": notes,
    }
    spinners: list[mp.process.BaseProcess] = []
    ok = True
    try:
        if args.monitor_cost:
            result = run_monitor_cost(scale)
            print(json.dumps(result, indent=2))
            return 0 if "error" not in result else 1
        for wl in workloads(scale):
            if args.only and wl.name not in args.only.split(","):
                continue
            for n_subs in sub_counts:
                movers = [tcls for tcls in transports if getattr(tcls, "throughput", True)]
                runs: dict[str, list[dict]] = {tcls.name: [] for tcls in movers}
                for round_ in range(args.repeat):
                    # Round robin, starting one further each round: no transport always
                    # runs first (on a fresh machine) or right after the heaviest one.
                    shift = round_ % len(movers)
                    for tcls in movers[shift:] + movers[:shift]:
                        cell = run_cell(tcls, wl, n_subs)
                        runs[tcls.name].append(cell)
                        if not args.json:
                            status = "ERROR" if "error" in cell else f"{cell['events_per_s']:,.0f} ev/s"
                            print(f"  .. {wl.name} x{n_subs} {tcls.name}: {status}", file=sys.stderr)
                for tcls in movers:
                    cell = median_cell(runs[tcls.name])
                    doc["throughput"].append(cell)
                    ok &= "error" not in cell
        n_pp = max(100, int(5000 * (0.2 if args.quick else 1.0)))
        for load in ("idle", "busy (2x nice-19 spin)"):
            if load != "idle":
                spinners = [_start(_spin, index) for index in range(2)]
                time.sleep(0.2)
            for tcls in transports:
                r = run_pingpong(tcls, n_pp, load)
                doc["latency"].append(r)
                ok &= "error" not in r
            for p in spinners:
                p.terminate()
            for p in spinners:
                p.join(5)
            spinners = []
    except KeyboardInterrupt:
        notes.append("interrupted")
        ok = False
    finally:
        for p in spinners:
            p.terminate()
        _stop_all_children()
        gc.collect()
        left = _gc.namespace_entries(namespace)
        removed = _gc.sweep(namespace).all()
        if removed:
            notes.append(f"WARNING: sweep removed {len(removed)} leftover(s) in /dev/shm: {removed[:5]}")
        still = _gc.namespace_entries(namespace)
        if left and not removed:
            notes.append(f"WARNING: {len(left)} entr(ies) of the namespace in /dev/shm at exit: {left[:5]}")
        if still:
            notes.append(f"WARNING: {len(still)} entr(ies) still in /dev/shm after sweep: {still[:5]}")
            ok = False
        try:
            ring_left = [e for e in os.listdir("/dev/shm") if e.startswith((f"plainring-{os.getpid()}-", f"sem.plainring-{os.getpid()}-"))]
        except OSError:
            ring_left = []
        if ring_left:
            notes.append(f"WARNING: plain ring left {len(ring_left)} entr(ies) in /dev/shm: {ring_left[:5]}")
            ok = False

    doc["summary"] = summarize(doc)
    if args.png:
        problem = draw_png(doc, args.png)
        notes.append(problem or f"chart written to {args.png}")
    doc["ok"] = bool(ok)
    doc["meta"]["wall_seconds"] = time.monotonic() - started
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_tables(doc)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
