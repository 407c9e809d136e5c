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
The consumer pulls with requests of its own, answered on an inbox callback (nats-py's
``fetch`` costs a task, a ``wait_for`` and a uuid per message); the injector sends a batch
with marked sends under one hold of the feed's send lock (``inject``).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from . import _bridge_wire, _marks

if TYPE_CHECKING:
    from ._bridge import Bridge, _BridgedFeed

SEQUENCE_SPAN = 1 << 16  # a value's mark: its message's stream sequence times this, plus its place in it
DEFAULT_MAX_AGE = 86400.0  # seconds a stream the bridge makes keeps values, unless told
DUPLICATE_WINDOW = 600.0  # seconds the server remembers message ids: an outage longer may duplicate
ACK_TIMEOUT = 5.0  # seconds without JetStream's acknowledgement before everything held is resent
REFUSALS = 5  # error answers (not "no responders") after which a message is dropped, counted
ACK_WAIT = 60.0  # seconds the server waits for our acknowledgement before delivering again
PULL_BATCH = 512  # messages one pull request asks for
PULL_SECONDS = 1.0  # a pull request's expiry (the server answers 408 then)
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
        held = self.held.pop(msg_id)
        held.bridged.settle(self.held)
        if not self.has_room.is_set() and len(self.held) < self.max_pending:
            self.has_room.set()
        if not self.held:
            self.emptied.set()

    async def publish(self, bridged: "_BridgedFeed", messages: list[bytes], values: int, first: int, end: int) -> None:
        """Publish one message of ``values`` values from the outbox, the first at index
        ``first``, ending at outbox position ``end`` (or one value's parts, in order), each
        held until acknowledged; while NATS is away they are only held (the resend
        publishes them). Waits while ``max_pending`` are held. The message id is the
        outbox's origin and ``first`` (and the part's place): a successor that publishes
        the same message again gives it the same id, and JetStream drops it."""
        for index, data in enumerate(messages):
            while len(self.held) >= self.max_pending:
                self.has_room.clear()
                await self.has_room.wait()
            # One token (the reply subject ends in it).
            msg_id = f"{bridged.origin}-{first}" if len(messages) == 1 else f"{bridged.origin}-{first}-{index}"
            held = _Held(bridged, bridged.publish_subject, data, {MSG_ID_HEADER: msg_id},
                         values if index == len(messages) - 1 else 0)
            self.held[msg_id] = held
            bridged.unacked.append((msg_id, end))
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

    async def stored_through(self, bridged: "_BridgedFeed") -> int:
        """The index of the last value JetStream holds from ``bridged``'s outbox (-1: none),
        read from the last message on the outbox's subject: its id gives the index of its
        first value, a packed message's count the rest; of a split value's part, the value
        before it is the last one whole (the parts come again, and those stored are dropped
        as duplicates). Asked until JetStream answers."""
        from nats.js.errors import NotFoundError

        js = self.nc.jetstream()
        wait = READY_BACKOFF[0]
        while not self.nc.is_closed:
            try:
                msg = await js.get_last_msg(stream_name(self.bridge.realm), bridged.publish_subject)
            except NotFoundError:
                return -1
            except Exception:  # noqa: BLE001 (NATS or JetStream not there yet)
                await asyncio.sleep(wait)  # a backoff between asks of a server coming back
                wait = min(wait * 2, READY_BACKOFF[1])
                continue
            return last_index(bridged.origin, (msg.headers or {}).get(MSG_ID_HEADER, ""), msg.data or b"")
        return -1

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
    """The namespace's durable pull consumer (loop thread), feeding the bridge's injectors.

    It pulls with requests of its own (``PULL_BATCH`` messages, expiring after
    ``PULL_SECONDS``) answered on an inbox subscription whose callback routes each message:
    nats-py's ``fetch`` costs a task, a ``wait_for`` and a uuid per message. A new request
    goes out while the ones outstanding still ask for ``PULL_BATCH // 2`` or more, so the
    server always has one to fill; never more than leaves ``MAX_UNAPPLIED`` room.
    """

    def __init__(self, bridge: "Bridge", home: str, on_message: Callable[[Any, int], None]) -> None:
        self.bridge = bridge
        self.nc = bridge._nc
        self.js = bridge._nc.jetstream()
        self.home = home
        self.on_message = on_message  # (msg, stream sequence): the bridge routes it
        self.inbox = f"_INBOX.shmfeed.{bridge.origin}.pull"
        self.subscription: Any = None  # the inbox's, made once (nats-py renews it at a reconnect)
        self.next_subject = ""  # where pull requests go (the consumer's MSG.NEXT subject)
        self.task: asyncio.Task[None] | None = None
        self.unapplied = 0  # values handed to injectors, not yet delivered (loop thread)
        self.has_room = asyncio.Event()
        self.has_room.set()
        self.remake = asyncio.Event()  # set on reconnect: the consumer is made again
        self.stopping = False
        # Pull requests outstanding, oldest first, as [token, messages it may still bring,
        # when it is forgotten here (its 408 lost with a connection)]. The server fills
        # them in that order; a message does not say which one it answers (its subject is
        # the stream's), a status does (408: expired, with what it did not bring).
        self.requests: collections.deque[list[Any]] = collections.deque()
        self.requested = 0  # messages the requests may still bring, all together
        self.generation = 0  # the consumer's making: a status of an older request is passed over
        self.request_counter = 0
        self.changed = asyncio.Event()  # a request ended, or room freed
        self.refused = False  # the server refused a request (not a timeout): remake, after a pause
        self.last_reply = ""  # the last message's reply subject: how many are still pending
        self.acks: set[asyncio.Task[None]] = set()
        # Acknowledgements are cumulative (AckPolicy.ALL): once per turn of the loop, the
        # released message with the highest stream sequence below every outstanding one.
        self.outstanding: dict[int, int] = {}  # stream sequence -> messages of it not released
        self.sequence_of: dict[int, int] = {}  # id(msg) -> its stream sequence
        self.released: list[tuple[int, int, Any]] = []  # heap of (sequence, tiebreak, msg)
        self.ack_planned = False

    @property
    def lag(self) -> int:
        """Messages of the stream still to deliver to this consumer, as of its last message."""
        return _reply_numbers(self.last_reply)[1]

    async def start(self) -> None:
        self.subscription = await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_pulled)
        await self._make()
        self.task = asyncio.get_running_loop().create_task(self._pull_all())

    async def _make(self) -> None:
        """(Re)make the durable consumer from its acknowledgement floor."""
        from nats.js import api
        from nats.js.errors import NotFoundError

        stream, durable = stream_name(self.bridge.realm), consumer_name(self.home)
        config = api.ConsumerConfig(
            durable_name=durable, ack_policy=api.AckPolicy.ALL, ack_wait=ACK_WAIT,
            max_ack_pending=MAX_UNAPPLIED * 4, filter_subject=f"shmfeed.{self.bridge.realm}.>",
        )
        self.generation += 1
        self.requests.clear()
        self.requested = 0
        try:
            info = await self.js.consumer_info(stream, durable)
            start = info.ack_floor.stream_seq + 1
            await self.js.delete_consumer(stream, durable)
        except NotFoundError:
            start = (await self.js.stream_info(stream)).state.last_seq + 1  # first start: from now on
        config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = start
        await self.js.add_consumer(stream, config)
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"

    async def _pull_all(self) -> None:
        while not self.stopping:
            await self.has_room.wait()
            if self.remake.is_set() or self.refused:
                if self.refused:
                    await asyncio.sleep(READY_BACKOFF[0])  # a pause before asking again
                self.remake.clear()  # before: a reconnect while it is made again asks again
                self.refused = False
                try:
                    await self._make()
                except Exception:  # noqa: BLE001 (NATS not back yet: tried again)
                    self.remake.set()
                    await asyncio.sleep(READY_BACKOFF[0])
                    continue
            self.changed.clear()  # before the look: what changes from now on wakes the wait below
            self._forget_expired()
            room = MAX_UNAPPLIED - self.unapplied - self.requested
            if (self.requested < PULL_BATCH // 2 and self.nc.is_connected
                    and (room >= PULL_BATCH // 4 or (room > 0 and not self.requested))):
                await self._request(min(PULL_BATCH, room))
            try:  # disconnected: a short wait, so that the reconnect's remake comes soon
                await asyncio.wait_for(self.changed.wait(), PULL_SECONDS if self.nc.is_connected else READY_BACKOFF[0])
            except asyncio.TimeoutError:
                pass

    async def _request(self, batch: int) -> None:
        self.request_counter += 1
        token = f"{self.generation}-{self.request_counter}"
        self.requests.append([token, batch, time.monotonic() + PULL_SECONDS * 2 + 1.0])
        self.requested += batch
        request = b'{"batch":%d,"expires":%d}' % (batch, int(PULL_SECONDS * 1e9))
        try:
            await self.nc.publish(self.next_subject, request, reply=f"{self.inbox}.{token}")
        except Exception:  # noqa: BLE001 (disconnected meanwhile: the reconnect remakes the consumer)
            self._end_request(token)

    def _end_request(self, token: str) -> None:
        for request in self.requests:
            if request[0] == token:
                self.requests.remove(request)
                self.requested -= request[1]
                self.changed.set()
                return

    def _forget_expired(self) -> None:
        now = time.monotonic()
        while self.requests and self.requests[0][2] < now:
            self.requested -= self.requests.popleft()[1]

    async def _on_pulled(self, msg: Any) -> None:
        """A message, or a status, answering our pull requests (loop thread)."""
        if self.stopping:
            # Come after stop(): not acknowledged, and no acknowledgement covers it (the
            # consumer delivers in stream order: none is of a later message).
            return
        reply = msg.reply
        if not reply:
            status = (msg.headers or {}).get("Status")
            if status is None:
                return  # not JetStream's
            token = msg.subject.rpartition(".")[2]
            if token.partition("-")[0] != str(self.generation):
                return  # of a consumer deleted since
            # The request ended: 408 expired (or 404, nothing now), else refused (409:
            # the consumer deleted, a limit; 503: JetStream not there): remade after a pause.
            self._end_request(token)
            if status not in ("408", "404", "100"):
                self.refused = True
            return
        requests = self.requests
        if requests:
            head = requests[0]
            head[1] -= 1
            self.requested -= 1
            if head[1] <= 0:
                requests.popleft()
                self.changed.set()
        sequence = _reply_numbers(reply)[0]
        if sequence < 0:
            return  # not a JetStream message: nothing to deliver or acknowledge
        self.last_reply = reply
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
        if self.requested < PULL_BATCH // 2:
            self.changed.set()  # room for another request
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
        self.stopping = True  # what comes from now on is passed over
        self.has_room.set()
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except BaseException:  # noqa: BLE001 (cancelled, or ended by a lost connection)
                pass
        if self.subscription is not None:
            try:
                await self.subscription.unsubscribe()
            except Exception:  # noqa: BLE001 (the connection may be gone)
                pass


def inject(bridged: "_BridgedFeed", batch: list[tuple[bytes, str, Applying | None]]) -> None:
    """A durable bridge's injector, one batch (injector thread): every value checked, then
    all sent in order with marked sends (``Feed._send_marked_many``: one hold of the feed's
    send lock for many, not one per value), then the messages of the values delivered (or
    dropped) acknowledged, with one wake-up of the loop."""
    from ._bridge import _is_value_of
    from ._errors import FeedClosed, FeedTypeError

    key = bridged.bridge.mark_key
    items: list[tuple[bytes, str, _marks.Mark]] = []
    done: list[Any] = []
    values = 0
    for payload, type_name, applying in batch:
        if applying is None:
            continue
        done.extend(applying.messages)
        values += 1
        if _is_value_of(payload, type_name):
            items.append((payload, type_name, _marks.Mark(key, applying.sequence)))
        else:
            bridged.drop("undecodable")
    # An unexpected error here ends the injector, its messages not acknowledged: they stay
    # below the acknowledgement floor, and the stream delivers them again after a restart.
    answers = bridged.feed._send_marked_many(items, bridged.channel_id) if items else []
    delivered = redelivered = 0
    for answer in answers:
        if isinstance(answer, FeedTypeError):
            bridged.drop("type")
        elif isinstance(answer, FeedClosed):
            bridged.drop("closed")
        elif isinstance(answer, Exception):
            bridged.drop("inject_error")
        elif answer == _marks.ALREADY_APPLIED:
            redelivered += 1
        else:
            delivered += 1
    with bridged.counts_lock:
        bridged.in_ += delivered
        bridged.redelivered += redelivered
    if values:
        bridged.bridge._applied(done, values)


def last_index(origin: str, msg_id: str, data: bytes) -> int:
    """The index of the last whole value a message of ``origin`` stored (see
    ``DurablePublisher.stored_through``); -1 if it is not one of that origin's."""
    head, _, rest = msg_id.partition("-")
    first, _, part = rest.partition("-")
    if head != origin or not first.isdigit():
        return -1
    if part:
        return int(first) - 1
    envelope = _bridge_wire.parse(data)
    if envelope is None or not envelope.packed:
        return int(first)
    values = _bridge_wire.unpack(envelope.data)
    return int(first) + (len(values) - 1 if values else 0)


def _reply_numbers(reply: str) -> tuple[int, int]:
    """A JetStream message's stream sequence and the messages still pending after it, from
    its reply subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<sequence>.<consumer
    sequence>.<time>.<pending>``, or the longer form with a domain and an account hash);
    (-1, 0) for any other subject. Cheaper than nats-py's ``msg.metadata``."""
    tokens = reply.split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        return -1, 0
    try:
        if len(tokens) == 9:
            return int(tokens[5]), int(tokens[8])
        if len(tokens) >= 11:
            return int(tokens[7]), int(tokens[10])
    except ValueError:
        pass
    return -1, 0


async def _ack(msg: Any) -> None:
    try:
        await msg.ack()
    except Exception:  # noqa: BLE001 (NATS away: the message comes again and the marks skip it)
        pass
