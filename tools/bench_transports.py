"""``tools/bench.py``'s workloads and transports: shmfeed and the peers a user would pick
instead, each a small ``Transport`` (see its docstring), and the floors (a featureless
ring, a bare slot) that show what the building blocks allow."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import msgpack

CTX = mp.get_context("fork")  # fork: fast to start; shmfeed supports it (at-fork hooks)

# The prefix of the files iceoryx2 makes in this run (named by the bench's own process, the
# parent of every worker): what it leaves in /dev/shm is removed at the end, and nothing else.
ICEORYX2_PREFIX = f"sfbench{os.getpid()}_"

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

    def prepare_process(self) -> None:
        """In each sender and receiver process, before anything is timed: large events get
        the malloc tuning that shmfeed gives itself (see ``tune_malloc_for_large_values``),
        in every transport's processes alike."""
        if self.blob_len >= LARGE_EVENT_BYTES:
            tune_malloc_for_large_values()


class RawWorkload(Workload):
    """Raw 1 MiB ``bytes`` whose first 8 bytes are the sequence number (little-endian).

    The sender keeps one preallocated ``bytearray`` template, writes the sequence number
    into it and makes the event with ``bytes(template)``: one 1 MiB copy per event, in
    the sender, the same for every transport (counted in its tx CPU and in the rate).
    Not the template itself: a ``bytearray`` is a type of its own to shmfeed (it comes
    back as one), which it encodes at extra copies; ``bytes`` is what the issue asks.
    The receivers get ``bytes`` (the peers, shmfeed ``recv``) or a read-only
    ``memoryview`` (shmfeed ``recv_view``): ``check`` accepts any bytes-like value."""

    SEQ_BYTES = 8

    def __init__(self, name: str, events: int, capacity: int, buffer_size: int | None, size: int):
        super().__init__(name, events, capacity, buffer_size, blob=0)
        self.blob_len = size
        self._template = bytearray(b"\xa5" * size)  # touched: no page faults in the timed sends

    def make(self, i: int) -> Any:
        self._template[: self.SEQ_BYTES] = i.to_bytes(self.SEQ_BYTES, "little")
        return bytes(self._template)

    def make_into(self, buffer: Any, i: int) -> None:
        """Event i written into a writable buffer of ``blob_len`` bytes: the same one copy
        of the template as ``make``, into memory the transport lends (``builds_values``)."""
        buffer[:] = self._template
        buffer[: self.SEQ_BYTES] = i.to_bytes(self.SEQ_BYTES, "little")

    def check(self, v: Any, i: int) -> str | None:
        try:
            size = len(v)
            seq = int.from_bytes(v[: self.SEQ_BYTES], "little")
        except TypeError:
            return f"expected a bytes-like value, got {type(v).__name__}"
        if size != self.blob_len:
            return f"seq {i}: expected {self.blob_len} bytes, got {size}"
        if seq != i:
            return f"expected seq {i}, got {seq}"
        return None


# Events from this size on are "large": glibc's default mmap threshold is 128 KiB.
LARGE_EVENT_BYTES = 128 << 10


def tune_malloc_for_large_values() -> None:
    """Raise glibc's mmap and trim thresholds (to 32 and 64 MiB, as shmfeed does when it
    moves large values: shmfeed._spill.tune_malloc): freed large buffers are reused instead
    of unmapped. Without it glibc maps and unmaps fresh pages for each 1 MiB event built,
    packed or received, and the peers measured mostly page faults (5-20x slower than with
    it, on the raw workload; whether a run had it depended on what the bench's parent had
    freed before forking). Nothing where libc is not glibc."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 64 << 20)


def workloads(scale: float) -> list[Workload]:
    def n(x: int) -> int:
        return max(10, int(x * scale))

    return [
        Workload("small", n(150_000), capacity=1024, buffer_size=None, blob=0),
        Workload("4KiB", n(60_000), capacity=256, buffer_size=2 << 20, blob=4096),
        Workload("1MiB", n(2_000), capacity=8, buffer_size=None, blob=1 << 20),
        RawWorkload("1MiB-raw", n(2_000), capacity=8, buffer_size=None, size=1 << 20),
    ]


# --------------------------------------------------------------------------------------
# Transports
# --------------------------------------------------------------------------------------


class Transport:
    """A peer in the comparison.

    Parent process: ``setup(n_subs, workload)`` creates what must be shared (it survives the
    fork into sender and receivers), ``teardown()`` frees it.
    Sender process: ``sender()`` returns ``(send, finish)``; ``send(value)`` delivers one
    value to every subscriber (losslessly), ``finish()`` signals end of stream. A transport
    that ``builds_values`` gets ``send(i)`` and writes event i where it travels.
    ``sender_close()`` runs once every receiver has got everything (its CPU is not counted).
    Receiver process i: ``receiver(i)`` returns an iterator over the values, ending at the
    end of stream. It is called before the clock starts (connect/subscribe there).
    Latency: ``pp_setup()`` in the parent, ``pp_endpoint(side)`` in side 0 (pinger) or 1
    (ponger) returns ``(send, recv)``; ``pp_teardown()`` in the parent.
    """

    name = "base"
    note = ""
    # True: the harness calls ``send(i)`` and the transport builds event i itself, in
    # place (``Workload.make_into``), instead of ``send(workload.make(i))``.
    builds_values = False

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
        self.workload = workload
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


class ShmfeedViewTransport(ShmfeedTransport):
    """shmfeed as above, but each receiver takes values with ``Channel.recv_view()``: a
    spilled 1 MiB value arrives as a read-only view of its file, without a copy."""

    name = "shmfeed recv_view"
    note = "as shmfeed, receivers take Channel.recv_view() (a read-only view, no copy); 1MiB-raw only"
    variant_of = "shmfeed"  # not a peer: shmfeed itself, another way to receive
    only_workloads = ("1MiB-raw",)  # other values come as by recv(): nothing new to measure
    latency = False  # a small value comes as by recv(): the same ping-pong as shmfeed's

    def receiver(self, i: int) -> Iterator[Any]:
        return self._views(self.channels[i])

    @staticmethod
    def _views(channel) -> Iterator[Any]:
        import shmfeed

        while True:
            try:
                value = channel.recv_view()
            except shmfeed.ChannelClosed:
                return
            yield value
            # Let go of the view before the next receive, so the sender can reuse the
            # file from its pool (it cannot while a view pins it).
            if isinstance(value, memoryview):
                value.release()
            del value


class ShmfeedLoanTransport(ShmfeedViewTransport):
    """shmfeed whose sender writes each event in place, in a ``Feed.loan`` buffer (the
    template's one copy goes where the value travels, not into a ``bytes`` first), and whose
    receivers take ``recv_view()``: one copy per event in all."""

    name = "shmfeed loan+view"
    note = "as shmfeed recv_view, the sender writing each event into Feed.loan(size).buffer; 1MiB-raw only"
    builds_values = True

    def sender(self):
        feed, n_subs, workload = self.feed, self.n_subs, self.workload
        loan, make_into, size = feed.loan, workload.make_into, workload.blob_len

        def send(i: int) -> None:
            lent = loan(size)
            make_into(lent.buffer, i)
            got = lent.send()
            if got != n_subs:
                raise RuntimeError(f"loan.send delivered to {got} channels, expected {n_subs}")

        _, finish = super().sender()
        return send, finish


class ShmfeedBatchTransport(ShmfeedTransport):
    """shmfeed as above, with the batched calls: the sender hands ``Feed.send_many`` the
    values in groups of ``BATCH`` (the last group at the end of the stream), each receiver
    takes what is there with ``Channel.recv_many``: a Python call per batch, not per value.
    The same lossless rules and order."""

    name = "shmfeed batched"
    note = "as shmfeed, with Feed.send_many (groups of 64) and Channel.recv_many(256); small and 4 KiB values"
    variant_of = "shmfeed"
    only_workloads = ("small", "4KiB")  # a batch saves per-call costs: what small and mid-sized values are made of
    latency = False  # a ping-pong has one value in flight: nothing to batch
    BATCH = 64

    def sender(self):
        feed, n_subs, batch_size = self.feed, self.n_subs, self.BATCH
        pending: list[Any] = []

        def flush() -> None:
            if pending:
                counts = feed.send_many(pending)
                if counts.count(n_subs) != len(counts):
                    raise RuntimeError(f"feed.send_many delivered {counts[:8]}..., expected {n_subs} each")
                pending.clear()

        def send(value: Any) -> None:
            pending.append(value)
            if len(pending) >= batch_size:
                flush()

        def finish() -> None:
            flush()
            for ch in self.channels:
                ch.close()

        return send, finish

    def receiver(self, i: int) -> Iterator[Any]:
        # Each batch's values are iterated in C, as a loop over recv_many's list would:
        # the generator is resumed once per batch, not once per value.
        return itertools.chain.from_iterable(self._batches(self.channels[i]))

    @staticmethod
    def _batches(channel) -> Iterator[list[Any]]:
        import shmfeed

        while True:
            try:
                yield channel.recv_many(256)
            except shmfeed.ChannelClosed:
                return


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
        config = iox2.config.default()
        config.global_cfg.prefix = iox2.FileName.new(ICEORYX2_PREFIX)  # this run's files: see bench.py
        return iox2.NodeBuilder.new().config(config).create(iox2.ServiceType.Ipc)

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
    ShmfeedViewTransport,
    ShmfeedLoanTransport,
    ShmfeedBatchTransport,
    PlainRingTransport,
    BareSlotTransport,
]
BASELINE = "shmfeed"


