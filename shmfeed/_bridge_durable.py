"""A durable bridge's two halves over JetStream (SPEC §7 ``--durable``): publishing with
acknowledgements, and the namespace's durable consumer. Used by ``_bridge.Bridge``; runs
on its event loop (nats-py is imported by the caller before any of this is used).

Stream: one per realm, ``SHMFEED_<realm>``, file storage, on ``shmfeed.<realm>.>`` (the
subjects core bridges use too), old messages discarded past ``--max-age``/``--max-bytes``,
duplicates (same ``Nats-Msg-Id``) dropped by the server within ``DUPLICATE_WINDOW``.

Out (``DurablePublisher``): every message (a value, or each part of a split one) gets a
message id (the bridge's random origin id and its sequence) and is held until JetStream
acknowledges it, at most ``max_pending`` messages. While NATS is away nothing is published;
when it is back (and its JetStream answers) everything held is published again, in order,
with the same ids: what the server stored before the outage is dropped as a duplicate, so
each value is stored once and, per bridge, in the order sent. A message not acknowledged
within ``ACK_TIMEOUT`` makes the same resend. nats-py's own buffer of writes not yet on the
socket is emptied when the connection drops: it would replay them ahead of the resend.

In (``DurableConsumer``): one durable pull consumer per namespace and realm
(``shmfeed-<home>``, ``home`` a keyed hash of the namespace: another host or namespace has
another). Each value is sent into its local feed with a marked send (``_marks``) carrying
its stream sequence, then acknowledged. At each start and after each reconnect the consumer
is made again from its acknowledgement floor, so what was not acknowledged comes again, in
stream order, and the marks skip what was already delivered: nothing lost, nothing twice.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ._bridge import Bridge, _BridgedFeed

SEQUENCE_SPAN = 1 << 16  # a value's mark: its message's stream sequence times this, plus its place in it
DEFAULT_MAX_AGE = 86400.0  # seconds a stream the bridge makes keeps values, unless told
DUPLICATE_WINDOW = 600.0  # seconds the server remembers message ids: an outage longer may duplicate
ACK_TIMEOUT = 5.0  # seconds without JetStream's acknowledgement before everything held is resent
REFUSALS = 5  # error answers (not "no responders") after which a message is dropped, counted
ACK_WAIT = 60.0  # seconds the server waits for our acknowledgement before delivering again
FETCH_BATCH = 256
FETCH_SECONDS = 1.0
MAX_UNAPPLIED = 4096  # values fetched and not yet delivered locally, all feeds together
READY_BACKOFF = (0.1, 2.0)  # first and longest wait between probes of JetStream after a reconnect
MSG_ID_HEADER = "Nats-Msg-Id"


def stream_name(realm: str) -> str:
    return f"SHMFEED_{realm}"


def consumer_name(home: str) -> str:
    return f"shmfeed-{home}"


async def ensure_stream(js: Any, realm: str, max_age: float | None, max_bytes: int | None) -> None:
    """The realm's stream, made if missing; ``max_age``/``max_bytes`` given: set on it."""
    from nats.js import api
    from nats.js.errors import NotFoundError

    name = stream_name(realm)
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        max_age = max_age or DEFAULT_MAX_AGE
        config = api.StreamConfig(
            name=name, subjects=[f"shmfeed.{realm}.>"], storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD, duplicate_window=min(DUPLICATE_WINDOW, max_age or DUPLICATE_WINDOW),
            max_age=max_age, max_bytes=max_bytes if max_bytes is not None else -1,
        )
        await js.add_stream(config)
        return
    if max_age is not None or max_bytes is not None:
        config = info.config
        if max_age is not None:
            config.max_age = max_age
            config.duplicate_window = min(config.duplicate_window or DUPLICATE_WINDOW, max_age)
        if max_bytes is not None:
            config.max_bytes = max_bytes
        await js.update_stream(config)


@dataclass
class _Held:
    """A message published and not yet acknowledged by JetStream."""

    bridged: "_BridgedFeed"
    subject: str
    data: bytes
    headers: dict[str, str]
    values: int  # values out once it is acknowledged: 0 for a part but the last
    sent: float = 0.0
    round: int = -1  # the publisher's round (connection, resend) it was last sent in
    refusals: int = 0  # JetStream's error answers to it


class DurablePublisher:
    """Publishes with JetStream acknowledgements; holds what is not acknowledged (loop thread)."""

    def __init__(self, bridge: "Bridge", max_pending: int) -> None:
        self.bridge = bridge
        self.nc = bridge._nc
        self.max_pending = max_pending
        self.held: dict[str, _Held] = {}  # by message id, in publish order
        self.has_room = asyncio.Event()  # fewer than max_pending held
        self.has_room.set()
        self.emptied = asyncio.Event()  # nothing held
        self.emptied.set()
        self.ready = asyncio.Event()  # connected, JetStream answers, nothing held waits for a resend
        self.inbox = f"_INBOX.shmfeed.{bridge.origin}"
        self.counter = 0
        self.round = 0  # a new one at every resend: what was not sent in it yet is
        self.resending: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_ack)
        self.ready.set()

    def pending(self) -> int:
        return len(self.held)

    async def all_acknowledged(self) -> None:
        await self.emptied.wait()

    def _forget(self, msg_id: str) -> None:
        del self.held[msg_id]
        if not self.has_room.is_set() and len(self.held) < self.max_pending:
            self.has_room.set()
        if not self.held:
            self.emptied.set()

    async def publish(self, bridged: "_BridgedFeed", messages: list[bytes], values: int = 1) -> None:
        """Publish one value's messages (one, or its parts in order), each held until
        acknowledged; while NATS is away they are only held (the resend publishes them).
        Waits while ``max_pending`` are held."""
        for index, data in enumerate(messages):
            while len(self.held) >= self.max_pending:
                self.has_room.clear()
                await self.has_room.wait()
            self.counter += 1
            msg_id = f"{self.bridge.origin}-{self.counter}"  # one token: the reply subject ends in it
            held = _Held(bridged, bridged.subject, data, {MSG_ID_HEADER: msg_id},
                         values if index == len(messages) - 1 else 0)
            self.held[msg_id] = held
            self.emptied.clear()
            if self.ready.is_set():
                await self._send(msg_id, held)

    async def _send(self, msg_id: str, held: _Held) -> None:
        held.sent = time.monotonic()
        held.round = self.round
        await self.nc.publish(held.subject, held.data, reply=f"{self.inbox}.{msg_id}", headers=held.headers)

    async def _on_ack(self, msg: Any) -> None:
        msg_id = msg.subject.rpartition(".")[2]
        held = self.held.get(msg_id)
        if held is None:
            return  # acknowledged before (a resent duplicate)
        data: bytes = msg.data
        # The common answer, {"stream":...,"seq":N} (maybe "duplicate":true), without a parse.
        stored = data.startswith(b'{"stream":') and b'"seq":' in data and b'"error"' not in data
        if not stored:
            try:
                answer = json.loads(data) if data else {}
            except ValueError:
                answer = {}
            if isinstance(answer, dict) and "error" in answer:
                held.refusals += 1
                if held.refusals >= REFUSALS:  # JetStream refuses it for good (a stream limit, ...)
                    self._forget(msg_id)
                    held.bridged.drop("publish_error")  # a part: the receivers drop the value whole
                    return
            if not isinstance(answer, dict) or "seq" not in answer:
                self.resend_soon()  # no responders (JetStream not up yet), or an error: later, in order
                return
        self._forget(msg_id)
        if held.values:
            held.bridged.count_out(held.values)

    def on_disconnected(self) -> None:
        self.ready.clear()
        # Writes nats-py queued and did not put on the socket would go out on the new
        # connection ahead of our resend, out of order: we resend them ourselves.
        if hasattr(self.nc, "_pending") and hasattr(self.nc, "_pending_data_size"):
            self.nc._pending = []
            self.nc._pending_data_size = 0

    def on_reconnected(self) -> None:
        self.resend_soon()

    def resend_soon(self) -> None:
        """Stop new publishes, wait for JetStream, publish everything held again in order."""
        self.ready.clear()
        if self.resending is None or self.resending.done():
            self.resending = asyncio.get_running_loop().create_task(self._resend())

    async def _resend(self) -> None:
        js = self.nc.jetstream()
        wait = READY_BACKOFF[0]
        while True:
            if self.nc.is_closed:
                return
            if self.nc.is_connected:
                try:
                    await js.stream_info(stream_name(self.bridge.realm))
                    break
                except Exception:  # noqa: BLE001 (not up yet: any answer but the stream's)
                    pass
            await asyncio.sleep(wait)  # a backoff between probes of a server coming back
            wait = min(wait * 2, READY_BACKOFF[1])
        self.round += 1
        while True:  # publish() holds more meanwhile: they go in this round too, in order
            unsent = [(msg_id, held) for msg_id, held in self.held.items() if held.round != self.round]
            if not unsent:
                break
            for msg_id, held in unsent:
                if msg_id in self.held:
                    await self._send(msg_id, held)
        self.ready.set()

    def check_acks(self) -> None:
        """Called periodically: a message held past ACK_TIMEOUT makes everything resend."""
        if not self.held or not self.ready.is_set():
            return
        oldest = next(iter(self.held.values()))
        if time.monotonic() - oldest.sent > ACK_TIMEOUT:
            self.resend_soon()


@dataclass
class Applying:
    """A value from the stream on its way into a local feed: its stream sequence and the
    messages to acknowledge once it is delivered (its parts, for a split value)."""

    sequence: int
    messages: list[Any] = field(default_factory=list)


class DurableConsumer:
    """The namespace's durable pull consumer (loop thread), feeding the bridge's injectors."""

    def __init__(self, bridge: "Bridge", home: str, on_message: Callable[[Any, int], None]) -> None:
        self.bridge = bridge
        self.nc = bridge._nc
        self.js = bridge._nc.jetstream()
        self.home = home
        self.on_message = on_message  # (msg, stream sequence): the bridge routes it
        self.subscription: Any = None
        self.task: asyncio.Task[None] | None = None
        self.unapplied = 0  # values handed to injectors, not yet delivered (loop thread)
        self.has_room = asyncio.Event()
        self.has_room.set()
        self.remake = asyncio.Event()  # set on reconnect: the consumer is made again
        self.lag = 0
        self.stopping = False
        self.acks: set[asyncio.Task[None]] = set()
        # Acknowledgements are cumulative (AckPolicy.ALL): once per turn of the loop, the
        # released message with the highest stream sequence below every outstanding one.
        self.outstanding: dict[int, int] = {}  # stream sequence -> messages of it not released
        self.sequence_of: dict[int, int] = {}  # id(msg) -> its stream sequence
        self.released: list[tuple[int, int, Any]] = []  # heap of (sequence, tiebreak, msg)
        self.ack_planned = False

    async def start(self) -> None:
        await self._make()
        self.task = asyncio.get_running_loop().create_task(self._fetch_all())

    async def _make(self) -> None:
        """(Re)make the durable consumer from its acknowledgement floor."""
        from nats.js import api
        from nats.js.errors import NotFoundError

        stream, durable = stream_name(self.bridge.realm), consumer_name(self.home)
        config = api.ConsumerConfig(
            durable_name=durable, ack_policy=api.AckPolicy.ALL, ack_wait=ACK_WAIT,
            max_ack_pending=MAX_UNAPPLIED * 4, filter_subject=f"shmfeed.{self.bridge.realm}.>",
        )
        try:
            info = await self.js.consumer_info(stream, durable)
            start = info.ack_floor.stream_seq + 1
            await self.js.delete_consumer(stream, durable)
        except NotFoundError:
            start = (await self.js.stream_info(stream)).state.last_seq + 1  # first start: from now on
        config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = start
        await self.js.add_consumer(stream, config)
        if self.subscription is not None:
            try:
                await self.subscription.unsubscribe()
            except Exception:  # noqa: BLE001 (the old one may be gone with the old connection)
                pass
        self.subscription = await self.js.pull_subscribe_bind(durable, stream)

    async def _fetch_all(self) -> None:
        import nats.errors

        while not self.stopping:
            await self.has_room.wait()
            if self.remake.is_set():
                try:
                    await self._make()
                    self.remake.clear()
                except Exception:  # noqa: BLE001 (NATS not back yet: tried again)
                    await asyncio.sleep(READY_BACKOFF[0])
                    continue
            try:
                messages = await self.subscription.fetch(FETCH_BATCH, timeout=FETCH_SECONDS)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except Exception:  # noqa: BLE001 (disconnected: wait for the reconnect, then remake)
                self.remake.set()
                await asyncio.sleep(READY_BACKOFF[0])
                continue
            for msg in messages:
                metadata = msg.metadata
                self.lag = int(metadata.num_pending)
                sequence = int(metadata.sequence.stream)
                self.outstanding[sequence] = self.outstanding.get(sequence, 0) + 1
                self.sequence_of[id(msg)] = sequence
                self.on_message(msg, sequence)

    def taken(self) -> None:
        """A value was handed to an injector (loop thread)."""
        self.unapplied += 1
        if self.unapplied >= MAX_UNAPPLIED:
            self.has_room.clear()

    def applied(self, messages: list[Any], values: int) -> None:
        """``values`` values were delivered (or will never be): acknowledge the messages
        they came in (loop thread)."""
        self.unapplied -= values
        if self.unapplied < MAX_UNAPPLIED // 2:
            self.has_room.set()
        self.ack(messages)

    def ack(self, messages: list[Any]) -> None:
        """Messages with nothing more to do: acknowledged (cumulatively) once every earlier
        one is too."""
        for msg in messages:
            sequence = self.sequence_of.pop(id(msg), None)
            if sequence is None:
                continue
            left = self.outstanding.get(sequence, 0) - 1
            if left > 0:
                self.outstanding[sequence] = left
            else:
                self.outstanding.pop(sequence, None)
            heapq.heappush(self.released, (sequence, id(msg), msg))
        if not self.ack_planned:
            self.ack_planned = True
            asyncio.get_running_loop().call_soon(self._ack_floor)

    def _ack_floor(self) -> None:
        self.ack_planned = False
        below = min(self.outstanding) if self.outstanding else None
        highest = None
        while self.released and (below is None or self.released[0][0] < below):
            highest = heapq.heappop(self.released)[2]
        if highest is not None:
            task = asyncio.get_running_loop().create_task(_ack(highest))
            self.acks.add(task)
            task.add_done_callback(self.acks.discard)

    async def acknowledged(self) -> None:
        """Every acknowledgement asked for so far is on its way."""
        await asyncio.sleep(0)  # the ones asked for from other threads just now
        if self.ack_planned:
            self._ack_floor()
        if self.acks:
            await asyncio.gather(*self.acks, return_exceptions=True)
        await self.nc.flush()

    async def stop(self) -> None:
        self.stopping = True
        self.has_room.set()
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except BaseException:  # noqa: BLE001 (cancelled, or ended by a lost connection)
                pass


async def _ack(msg: Any) -> None:
    try:
        await msg.ack()
    except Exception:  # noqa: BLE001 (NATS away: the message comes again and the marks skip it)
        pass
