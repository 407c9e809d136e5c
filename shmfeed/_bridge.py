"""``Bridge``: the named feeds of this namespace joined, through NATS, with the same feeds
of other namespaces on this host or others (SPEC §7): core NATS (at most once), or, with
``durable=True``, a JetStream stream (exactly once; that half is in ``_bridge_durable``).

One bridge per namespace and NATS realm. For each bridged feed it is a subscriber like any
other: its own channel (``drop_newest``: a local send never waits for the bridge; what the
ring drops is counted) is read by one thread that publishes each value's encoded bytes, as
the ring holds them, on ``shmfeed.<realm>.<token of the feed name>``. What it gets on that
subject from *other* bridges it sends into the local feed with a send that skips its own
channel (``FeedCore.send(skip_channel=...)``), so an injected value is never read back and
published again: no echo, no loop, with any number of namespaces. Every message is an
envelope (the origin bridge's random id, the sending namespace's home, the feed's name and
the value's type name: ``_bridge_wire``) and the value's bytes.

nats-py is asyncio: the bridge runs its own event loop in one thread; the user's code stays
synchronous. nats-py is imported here only, at ``start()``: ``import shmfeed`` never needs it.

Split values: a value over the server's ``max_payload`` (from the connection's INFO) is
published as parts, each a message whose envelope says the origin's sequence number of the
value, the part's position, the number of parts and the whole size. One connection's
messages keep their order, so the parts of one origin arrive in order and one after the
other: the receiver holds at most one partial value per origin and feed, joins it when its
last part comes, and drops it whole (counted ``incomplete``) when a part is missing, when
it takes over ``JOIN_TIMEOUT``, or when the bytes held in partial values would pass
``PARTIAL_BYTES_CAP``: never a truncated value. Nothing from the wire is trusted: the count
must be what the size and the first part's length give, every part but the last as long as
the first, the size at most ``MAX_VALUE_BYTES``; and every value, split or not, must decode
(and hold no reference to a host's memory) before it is sent locally.

Threads: per feed one reader (blocking receive from the bridge's channel, never a poll;
it takes what else is there at once and hands the batch to the loop with one wake-up,
where its small values go packed into as few messages as ``max_payload`` allows) and
one injector (the local send, which may wait while a local subscriber is full; the loop
hands it what arrived once per turn); the loop thread only publishes and parses. A value
that cannot be carried is dropped and counted, per feed and reason (``DROP_REASONS``),
never silently. While NATS is away a core bridge stops subscribing (a control thread, under
each feed's send lock), so local sends write no copy for it; what they send meanwhile is
counted from the feed's SENDS.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import queue
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import msgpack

from . import _bridge_durable, _bridge_outbox, _bridge_wire, _codec, _gc, _marks, _names, _peek, _shm
from . import _layout as L
from ._bridge_connect import ConnectOptions, OutageReporter, nats_kwargs, redacted as _redacted
from ._channel import Channel
from ._errors import ChannelClosed, ChannelCorruptError, FeedClosed, FeedTypeError, ShmfeedError, UnknownTypeError
from ._feed import Feed
from ._subscription import Subscription
from . import _bridge_status  # the status file shmfeed monitor reads

__all__ = ["Bridge", "BridgeFeedStatistics", "BridgeStatistics", "subject_of", "DROP_REASONS"]


CHANNEL_CAPACITY = 4096  # values the bridge's channel holds before the local side drops for it
PUBLISH_BACKLOG = 1024  # values handed to the loop and not yet published, per bridge
INJECT_BACKLOG = 1024  # batches from NATS waiting for the local send, per feed
MAX_VALUE_BYTES = 256 << 20  # the largest value a bridge splits, or joins
PARTIAL_BYTES_CAP = 256 << 20  # bytes a bridge holds in values not yet joined, all origins together
RESCAN_SECONDS = 0.5  # how often a bridge with patterns looks for feeds opened since
HIDDEN_PREFIXES = ("typemux-state:",)  # feeds of the library's own; bridged only when a pattern names them
JOIN_TIMEOUT = 10.0  # seconds a split value may take to arrive whole before it is dropped
MAX_PARTIALS = 1024  # values being joined at once, all origins and feeds together
CONTROL_SECONDS = 10.0  # the longest a pause or resume waits for a feed's send lock
READ_BATCH = 256  # values a reader takes at once (one hand-over to the loop)
MSG_ID_ROOM = 160  # bytes of a durable message's Nats-Msg-Id header

# Why a value was not carried (out: local -> NATS; in: NATS -> local).
DEFAULT_MAX_PENDING = 65536  # values a durable bridge holds unacknowledged (NATS away) per feed before its outbox drops

DROP_REASONS = {
    "overflow": "out: the bridge's channel was full (NATS or the bridge too slow): dropped by the ring",
    "local_reference": "out: the value holds a Channel (a reference to this host's shared memory)",
    "too_large": "out: the value is over MAX_VALUE_BYTES (256 MiB), more than a bridge joins",
    "disconnected": "out: NATS was not connected (core mode; a durable bridge holds them, see --max-pending)",
    "publish_error": "out: NATS refused the publish",
    "corrupt": "out: the bridge's channel held bytes that are not a value",
    "slow_local": "in: the local feed took values slower than NATS brought them",
    "slow_consumer": "in: NATS dropped messages for this bridge (it read too slowly)",
    "bad_message": "in: a message without the bridge's headers, or for another feed",
    "bad_part": "in: a part of a split value with a size, count or index that does not add up",
    "incomplete": "in: a split value that did not arrive whole (a part lost, too slow, or over the cap)",
    "undecodable": "in: bytes that are not a value (or hold a reference to a host's memory)",
    "type": "in: the value's type is not the local feed's",
    "closed": "in: the local feed is closed",
    "inject_error": "in: the local send failed",
}

_REALM = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
# msgpack ext codes whose payload is msgpack again (see the table in _codec): a Channel may
# hide inside them. Codes from CHANNEL_EXT_CODE up are references to local objects.
_NESTED_EXT_CODES = frozenset({2, 3, 4, 6, 7, 8, 9, 10, 13, 14, 15, 17, 18})
_CHANNEL_EXT_BYTE = bytes([_codec.CHANNEL_EXT_CODE])


def subject_of(realm: str, feed_name: str) -> str:
    """The NATS subject of a feed: its name hashed (subjects allow no spaces, dots are
    separators, ``*``/``>`` wildcards), so every host derives the same one from the name."""
    token = hashlib.sha256(feed_name.encode("utf-8")).hexdigest()[:32]
    return f"shmfeed.{realm}.{token}"


class _LocalReference(Exception):
    pass


def _scan_ext(code: int, data: bytes) -> Any:
    if code >= _codec.CHANNEL_EXT_CODE:
        raise _LocalReference
    if code in _NESTED_EXT_CODES and _CHANNEL_EXT_BYTE in data:
        msgpack.unpackb(data, raw=True, strict_map_key=False, ext_hook=_scan_ext)
    return None


def holds_local_reference(payload: bytes) -> bool:
    """Whether an encoded value holds a Channel (or another registered reference type):
    it means something only on this host. Nested ext payloads are stored verbatim, so a
    value with no byte equal to the ext code cannot hold one (the common case: one memchr).
    """
    if _CHANNEL_EXT_BYTE not in payload:
        return False
    try:
        msgpack.unpackb(payload, raw=True, strict_map_key=False, ext_hook=_scan_ext)
    except _LocalReference:
        return True
    except Exception:
        return False  # not ours to judge: the receiving side says it is corrupt
    return False


def named_feeds(namespace: str) -> list[str]:
    """The names of the named feeds of ``namespace`` now: read from their segments'
    headers in /dev/shm (ours only; destroyed or damaged ones passed over)."""
    names = []
    for entry in _gc.own_entries(namespace):
        if entry.kind is not _names.EntryKind.FEED:
            continue
        try:
            mapped = _gc.map_segment(entry.path)
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours
        if mapped is None:
            continue
        mapping = mapped[0]
        try:
            buffer = memoryview(mapping)
            words = buffer[: L.HEADER_BYTES].cast("Q")
            try:
                if words[L.MAGIC] == L.FEED_MAGIC and not words[L.DESTROYED] and words[L.NAME_LEN]:
                    names.append(L.read_text(buffer, L.FEED_NAME_OFFSET, int(words[L.NAME_LEN]), L.FEED_NAME_MAX))
            finally:
                words.release()
                buffer.release()
        finally:
            mapping.close()
    return names


def matches(pattern: str, name: str) -> bool:
    """Whether feed ``name`` is one ``pattern`` asks for: the name itself, or, for a
    pattern ending in ``*``, any name with that prefix (the library's hidden feeds, such
    as a TypeMux's state, only when the prefix names them)."""
    if not pattern.endswith("*"):
        return name == pattern
    prefix = pattern[:-1]
    if not name.startswith(prefix):
        return False
    return not any(name.startswith(hidden) and not prefix.startswith(hidden) for hidden in HIDDEN_PREFIXES)


@dataclass
class _Partial:
    """A split value being joined: the parts so far (in order), and what the first said."""

    sequence: int
    count: int
    size: int
    part_length: int
    type_name: str
    started: float
    parts: list[bytes] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)  # a durable bridge's, acknowledged once it is delivered


@dataclass(frozen=True)
class BridgeFeedStatistics:
    """What a bridge carried for one feed.

    Attributes:
        name: the feed's name.
        subject: its NATS subject.
        out: values published to NATS.
        in_: values from other bridges sent into the local feed.
        dropped: values not carried, by reason (see ``DROP_REASONS``); reasons with none
            are left out.
        redelivered: values a durable bridge got again from its stream and did not send
            again, having delivered them before (after a restart or a reconnect).
    """

    name: str
    subject: str
    out: int
    in_: int
    dropped: Mapping[str, int]
    redelivered: int = 0


@dataclass(frozen=True)
class BridgeStatistics:
    """A bridge's state: its id, its server, whether it is connected now (after an outage:
    and bridging its feeds again), its feeds.

    ``mode`` is ``"core"`` or ``"durable"``. For a durable bridge, ``lag`` is how many
    messages of the stream it has still to fetch (as of its last fetch) plus the values
    fetched and not yet delivered here, and ``held`` how many values its outboxes hold
    that JetStream has not stored yet (not published, or not acknowledged); both None in
    core mode."""

    origin: str
    server: str
    connected: bool
    reconnects: int
    feeds: tuple[BridgeFeedStatistics, ...]
    mode: str = "core"
    lag: int | None = None
    held: int | None = None


class _BridgedFeed:
    """One bridged feed: the local feed, the bridge's channel on it, counters, threads."""

    def __init__(self, bridge: "Bridge", name: str) -> None:
        self.bridge = bridge
        self.name = name
        self.subject = subject_of(bridge.realm, name)
        self.feed: Feed[Any] = Feed(name)
        label = f"bridge {name}"[:60]
        # A durable bridge's channel is its outbox (read without taking, taken over after a
        # SIGKILL: _bridge_outbox); its values are published on a subject of the outbox's
        # origin, and their message ids are the origin and each value's index.
        self.cursor: _peek.Cursor | None = None
        self.adopted = False
        self.subscription: Subscription
        if bridge.durable:
            self.channel, self.subscription, self.adopted = _bridge_outbox.open_outbox(
                self.feed, bridge.mark_key, bridge.max_pending, label)
            self.origin = _bridge_outbox.origin_of(bridge.home, self.channel._channel_id)
            self.publish_subject = f"{self.subject}.{self.origin}"
            self.cursor = _peek.Cursor(self.channel._live_core())
        else:
            self.channel = Channel(CHANNEL_CAPACITY, overflow="drop_newest", name=label)
            self.subscription = self.feed.subscribe(self.channel)
            self.origin, self.publish_subject = bridge.origin, self.subject
        self.channel_id = self.channel._channel_id
        # Durable, loop thread: the last value index JetStream holds from this outbox
        # (None: not asked yet, for an outbox taken over), and the messages published and
        # not yet acknowledged, in order, with the outbox position each one ends at.
        self.stored_through: int | None = None if self.adopted else -1
        self.unacked: collections.deque[tuple[str, int]] = collections.deque()
        self.counts_lock = threading.Lock()
        self.out = 0
        self.in_ = 0
        self.dropped: dict[str, int] = {}
        self.redelivered = 0
        # Batches of (value, type name, for a durable bridge the stream's part of it), or
        # None: stop. The loop collects a batch in ``incoming`` and hands it over once per
        # turn of the loop (one wake-up of the injector for many values).
        self.inbound: queue.Queue[list[tuple[bytes, str, _bridge_durable.Applying | None]] | None] = \
            queue.Queue(INJECT_BACKLOG)
        self.incoming: list[tuple[bytes, str, _bridge_durable.Applying | None]] = []
        self._envelope: tuple[str, bytes, bytes] | None = None  # (type name, whole and packed envelopes)
        self.paused_at: int | None = None  # the feed's SENDS when it stopped subscribing (see pause)
        # The envelope bytes of the last whole value and of the last packed message from
        # NATS, and what they say (loop thread).
        self.known_envelope: tuple[bytes, _bridge_wire.Envelope] | None = None
        self.known_packed: tuple[bytes, _bridge_wire.Envelope] | None = None
        # Split values being joined, by origin; the value an origin's later parts belong to
        # when it was dropped (they are passed over, not counted again). Loop thread only.
        self.partials: dict[str, _Partial] = {}
        self.passing_over: dict[str, int] = {}
        self.reader = threading.Thread(target=self._read if self.cursor is None else self._read_outbox,
                                       name=f"shmfeed-bridge-out {name}", daemon=True)
        self.injector = threading.Thread(target=self._inject, name=f"shmfeed-bridge-in {name}", daemon=True)

    def drop(self, reason: str, count: int = 1) -> None:
        with self.counts_lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def count_out(self, values: int = 1) -> None:
        with self.counts_lock:
            self.out += values

    def statistics(self) -> BridgeFeedStatistics:
        with self.counts_lock:
            dropped = dict(self.dropped)
            out, in_, redelivered = self.out, self.in_, self.redelivered
            missed = self._missed_sends()  # no lock: a torn read misreports once
            if missed:
                dropped["disconnected"] = dropped.get("disconnected", 0) + missed
        overflow = self.channel.statistics().dropped
        if overflow:
            dropped["overflow"] = overflow
        return BridgeFeedStatistics(self.name, self.subject, out, in_, MappingProxyType(dropped), redelivered)

    def type_name(self) -> str:
        core = self.feed._core
        if core is None:
            return ""
        if not core.type_name:
            core._refresh_type()
        return core.type_name

    def _read(self) -> None:
        """Local -> NATS: every value of the bridge's channel, raw, until it is closed."""
        core = self.channel._live_core()
        bridge = self.bridge
        closed = False
        while not closed:
            batch: list[bytes] = []
            try:
                batch.append(bytes(core.take(None)))  # a spilled value's view is valid only until the next take
                while len(batch) < READ_BATCH:  # and what else is there now: one hand-over for all
                    data = core.poll_fast(None)
                    if data is None:
                        break
                    batch.append(bytes(data))
            except ChannelClosed:
                closed = True
            except ChannelCorruptError:
                self.drop("corrupt")
            kept = [data for data in batch if not holds_local_reference(data)]
            if len(kept) < len(batch):
                self.drop("local_reference", len(batch) - len(kept))
            if kept:
                bridge._hand_to_loop(self, kept)

    def _read_outbox(self) -> None:
        """Local -> NATS, durable: the outbox read without taking (``_peek``), until the
        bridge closes; a value is taken once JetStream acknowledged it (``settle``)."""
        cursor = self.cursor
        assert cursor is not None
        while True:
            self.bridge._reading.wait()  # NATS away: the outbox holds what comes meanwhile
            try:
                peeked = cursor.read(READ_BATCH)
            except ChannelClosed:
                return
            except ChannelCorruptError:
                self.drop("corrupt")
                continue
            if not peeked:
                return  # stopped, and everything the outbox held is read
            kept = [value for value in peeked if not holds_local_reference(value.data)]
            if len(kept) < len(peeked):  # taken with the next value acknowledged
                self.drop("local_reference", len(peeked) - len(kept))
            if kept:
                self.bridge._hand_to_loop(self, [value.data for value in kept],
                                          [(value.number, value.end) for value in kept])

    def settle(self, unacknowledged: Mapping[str, Any]) -> None:
        """Durable, loop thread: take from the outbox every value whose message, and every
        message before it, JetStream acknowledged (or refused for good)."""
        end = 0
        unacked = self.unacked
        while unacked and unacked[0][0] not in unacknowledged:
            end = unacked.popleft()[1]
        if end and self.cursor is not None:
            self.commit(end)

    def commit(self, end: int) -> None:
        assert self.cursor is not None
        try:
            self.cursor.commit(end)
        except (ShmfeedError, OSError, ValueError):
            pass  # let go of meanwhile (closing): the next bridge reads it again, and JetStream drops it

    def envelopes(self, origin: str, home: str) -> tuple[bytes, bytes]:
        """The envelopes of this feed's whole values and of its packed messages
        (``_bridge_wire``), made once per type."""
        type_name = self.type_name()
        cached = self._envelope
        if cached is None or cached[0] != type_name:
            cached = self._envelope = (type_name, _bridge_wire.whole_prefix(origin, home, self.name, type_name),
                                       _bridge_wire.pack_prefix(origin, home, self.name, type_name))
        return cached[1], cached[2]

    def arrived(self, data: bytes, type_name: str, applying: _bridge_durable.Applying | None) -> None:
        """A value from NATS for the injector (loop thread): collected, handed over once
        the loop has handled what it has in hand."""
        if not self.incoming:
            asyncio.get_running_loop().call_soon(self._hand_over)
        self.incoming.append((data, type_name, applying))

    def _hand_over(self) -> None:
        batch, self.incoming = self.incoming, []
        try:
            self.inbound.put_nowait(batch)
        except queue.Full:
            self.drop("slow_local", len(batch))
            consumer = self.bridge._consumer
            if consumer is not None:  # durable: never so far behind (MAX_UNAPPLIED), but accounted all the same
                durable = [applying for _, _, applying in batch if applying is not None]
                consumer.applied([msg for applying in durable for msg in applying.messages], len(durable))

    def _inject(self) -> None:
        """NATS -> local: send what other bridges published, skipping our own channel. A
        durable bridge's value goes with a marked send (``_marks``), then is acknowledged."""
        while True:
            batch = self.inbound.get()
            if batch is None:
                return
            if self.bridge._consumer is not None:  # durable: marked sends, many at once
                _bridge_durable.inject(self, batch)
                continue
            done: list[Any] = []  # a durable bridge's messages of the values delivered
            values = 0
            try:
                for payload, type_name, applying in batch:
                    try:
                        self._inject_one(payload, type_name, applying)
                    finally:
                        if applying is not None:
                            done.extend(applying.messages)
                            values += 1
            finally:
                if values:
                    self.bridge._applied(done, values)  # one wake-up of the loop for the batch

    def _inject_one(self, payload: bytes, type_name: str, applying: _bridge_durable.Applying | None) -> None:
        if not _is_value_of(payload, type_name):
            self.drop("undecodable")
            return
        mark = None if applying is None else _marks.Mark(self.bridge.mark_key, applying.sequence)
        try:
            answer = self.feed._send_encoded(payload, type_name, self.channel_id, mark=mark)
        except FeedTypeError:
            self.drop("type")
            return
        except FeedClosed:
            self.drop("closed")
            return
        except (ShmfeedError, OSError):
            self.drop("inject_error")
            return
        with self.counts_lock:
            if answer == _marks.ALREADY_APPLIED:
                self.redelivered += 1
            else:
                self.in_ += 1

    def _missed_sends(self) -> int:
        """Sends of the feed since ``pause`` (0 when not paused, or the feed let go of)."""
        core, paused_at = self.feed._core, self.paused_at
        if paused_at is None or core is None or core.released:
            return 0
        try:
            return max(0, int(core.words[L.SENDS]) - paused_at)
        except ValueError:  # let go of meanwhile (the bridge closing)
            return 0

    def pause(self) -> None:
        """NATS went away (core mode): stop being one of the feed's subscribers, so that
        local sends do not write a copy for nothing; what they send meanwhile is counted
        (``disconnected``) from the feed's SENDS when NATS is back (``resume``). Control
        thread only."""
        if self.paused_at is not None:
            return
        core = self.feed._core
        if core is None:
            return
        with core.sends_held(time.monotonic() + CONTROL_SECONDS) as words:
            self.subscription.unsubscribe()
            with self.counts_lock:
                self.paused_at = int(words[L.SENDS])

    def resume(self) -> None:
        """NATS is back: subscribe again, and count the sends missed meanwhile."""
        core = self.feed._core
        if self.paused_at is None or core is None:
            return
        with core.sends_held(time.monotonic() + CONTROL_SECONDS):
            self.subscription = self.feed.subscribe(self.channel)
            self._stop_counting_missed()

    def _stop_counting_missed(self) -> None:
        """Count the sends missed while paused for good, and stop counting (one step for
        ``statistics``, which counts them meanwhile)."""
        with self.counts_lock:
            missed = self._missed_sends()
            if missed:
                self.dropped["disconnected"] = self.dropped.get("disconnected", 0) + missed
            self.paused_at = None

    def close_local(self) -> None:
        if self.cursor is not None:  # durable: the outbox stays, unless Bridge.close let it go
            self.cursor.stop()
            return
        self._stop_counting_missed()  # closed while NATS is away: what was sent meanwhile stays counted
        self.subscription.unsubscribe()
        self.channel.close()  # the reader takes what is left, then ChannelClosed ends it


class Bridge:
    """Join this namespace's named feeds with the same feeds of other namespaces, on this
    host or others, through a NATS server (core NATS: live fan-out, at most once).

    A value sent on a bridged ``Feed(name)`` here reaches, once, every subscription of
    ``Feed(name)`` in every namespace bridged to the same server and realm, with its exact
    type; nothing echoes back. Values of one sender arrive in the order sent. Local sends
    never wait for NATS: what cannot be carried (NATS down, too slow, a value holding a
    Channel, a value over 256 MiB) is dropped and counted in :meth:`statistics`, per feed
    and reason. A value over NATS's ``max_payload`` crosses split into parts and joined
    again, or not at all (a lost part drops it whole). Messages on the bridge's subjects
    that are not a bridge's values are counted and skipped.

    Needs ``nats-py`` (``pip install 'shmfeed[nats]'``). Use as a context manager, or call
    :meth:`start` and :meth:`close`.

    Args:
        url: the NATS server, e.g. ``nats://127.0.0.1:4222`` (user and password may be in it).
        feeds: the names of the feeds to bridge; a name ending in ``*`` is a prefix: every
            named feed that starts with it, opened now or later (looked for every
            ``RESCAN_SECONDS``). None (or empty): every named feed of the namespace (but
            the library's hidden ones, such as a TypeMux's state).
        realm: separates applications sharing one NATS (letters, digits, ``_``, ``-``).
        namespace: this process's namespace, set with ``set_namespace`` (default: the
            process's own).
        join_timeout: seconds a value split over NATS's ``max_payload`` may take to arrive
            whole; later it is dropped (counted ``incomplete``).
        durable: through JetStream (see ``_bridge_durable``): nothing lost or delivered
            twice across a restart of the NATS server (its store kept), of this bridge
            (even after SIGKILL), or an absence of this namespace shorter than the stream
            keeps values. One durable bridge per namespace and realm.
        max_age, max_bytes: a durable realm's stream keeps values this many seconds, or
            up to this many bytes (the oldest go first); None leaves the stream as it is
            (when the bridge makes it: one day, no byte limit).
        max_pending: values a durable bridge holds while NATS has not acknowledged
            them (NATS away), in each feed's outbox (a ring of at most 4 MiB); past it,
            the outbox drops (counted ``overflow``).
        creds: a NATS creds file (user JWT and nkey seed) to connect with.
        tls_ca: PEM file of the CA that signed the server's certificate; turns TLS on
            (a ``tls://`` URL does too, with the system's CAs unless this is given).
        tls_cert, tls_key: this client's PEM certificate and its key, for a server that
            verifies clients; both or neither. Secrets are never printed: URLs are shown
            without their credentials, creds files are never quoted.

    Raises:
        ValueError: a bad realm or feed name, or a connection option whose file is
            missing, unreadable or not what it should be.
    """

    def __init__(self, url: str, feeds: list[str] | tuple[str, ...] | None = None, realm: str = "default",
                 namespace: str | None = None, join_timeout: float = JOIN_TIMEOUT, *, durable: bool = False,
                 max_age: float | None = None, max_bytes: int | None = None,
                 max_pending: int = DEFAULT_MAX_PENDING, creds: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        if not isinstance(realm, str) or not _REALM.match(realm):
            raise ValueError(f"shmfeed: realm {realm!r} is not a valid realm; use 1 to 64 letters, digits, '_' or '-'")
        names = list(feeds or ["*"])
        for name in names:
            if "*" in name[:-1]:
                raise ValueError(f"shmfeed: feed pattern {name!r} has a '*' before its end; only a trailing '*' "
                                 f"(a prefix) is a pattern")
            if not name.endswith("*"):
                _names.validate_name(name, what="feed name")
        if len(set(names)) != len(names):
            raise ValueError("shmfeed: a feed name is given twice; give each feed once")
        if namespace is not None:
            _names.set_namespace(namespace)
        self.url = url
        self._connect_options = ConnectOptions(creds, tls_ca, tls_cert, tls_key).validate()
        self._failures = OutageReporter(url, self._connect_options)  # error_cb's lines, start()'s reason
        self.realm = realm
        self.feed_names = tuple(name for name in names if not name.endswith("*"))
        self.patterns = tuple(name for name in names if name.endswith("*"))
        self._scanner: threading.Thread | None = None
        self._stop_scanning = threading.Event()
        self.origin = uuid.uuid4().hex
        self._feeds: dict[str, _BridgedFeed] = {}
        self._by_subject: dict[str, _BridgedFeed] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._nc: Any = None
        # (feed, values, for a durable bridge each value's (index, end) in the outbox)
        self._outbound: asyncio.Queue[tuple[_BridgedFeed, list[bytes], list[tuple[int, int]] | None] | None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._backlog = threading.BoundedSemaphore(PUBLISH_BACKLOG)
        # Cleared while NATS is away (durable): the readers leave the values in the outboxes
        # (nothing read, copied or held for nothing; a local send only writes its copy).
        self._reading = threading.Event()
        self._reading.set()
        self._reconnects = 0
        self._down = False  # a disconnect was announced and no reconnect yet
        self._sequence = 0  # of split values this bridge published
        self._partial_bytes = 0  # reserved by values being joined (loop thread only)
        self._partial_count = 0
        self._expiry: asyncio.Task[None] | None = None
        if not join_timeout > 0:
            raise ValueError(f"shmfeed: join_timeout must be positive seconds, not {join_timeout!r}; "
                             f"give how long a split value may take to arrive whole")
        self.join_timeout = float(join_timeout)
        for what, number, kind in (("max_age", max_age, (int, float)), ("max_bytes", max_bytes, int),
                                   ("max_pending", max_pending, int)):
            if number is not None and (isinstance(number, bool) or not isinstance(number, kind) or not number > 0):
                raise ValueError(f"shmfeed: {what} must be a positive number, not {number!r}; give one above 0")
        if (max_age is not None or max_bytes is not None) and not durable:
            raise ValueError("shmfeed: max_age and max_bytes limit a durable bridge's stream; pass durable=True "
                             "(or leave them out)")
        self.durable = bool(durable)
        self.max_age = None if max_age is None else float(max_age)
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self.home = _names.bridge_home(_names.current_namespace())
        self.mark_key = _marks.key_of(realm)
        self._publisher: _bridge_durable.DurablePublisher | None = None
        self._consumer: _bridge_durable.DurableConsumer | None = None
        self._lock_file: tuple[int, str] | None = None  # a durable bridge's lock: descriptor, path
        # "pause"/"resume" for the feeds while NATS is away (core mode), done in order by
        # one thread: they wait for feeds' send locks, which the loop must never do.
        self._control: queue.Queue[str | None] = queue.Queue()
        self._controller: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._started = False
        self._closed = False
        self._status: _bridge_status.StatusPublisher | None = None  # the status file shmfeed monitor reads

    # --- lifetime --------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> "Bridge":
        """Connect to NATS and start bridging; returns once values cross (subscriptions
        made here and on the server).

        Raises:
            ImportError: nats-py is not installed (``pip install 'shmfeed[nats]'``).
            ShmfeedError: NATS could not be reached within ``timeout`` seconds.
        """
        with self._state_lock:
            if self._started:
                raise ShmfeedError("shmfeed: this bridge was started already; make a new Bridge to start again")
            self._started = True
        try:
            import nats  # noqa: F401  (only here: the core package never needs it)
        except ImportError as error:
            raise ImportError("shmfeed: the bridge needs nats-py; install it with pip install 'shmfeed[nats]'") from error
        if self.durable:
            self._lock_file = _one_durable_bridge(self.realm)
        for name in (*self.feed_names, *self._unbridged_matches()):
            # Subscribed before we connect: nothing sent after start() is missed.
            bridged = _BridgedFeed(self, name)
            self._feeds[name] = bridged
            self._by_subject[bridged.subject] = bridged
        loop = self._loop = asyncio.new_event_loop()
        loop.set_exception_handler(_quiet_exception)
        self._loop_thread = threading.Thread(target=loop.run_forever, name="shmfeed-bridge-loop", daemon=True)
        self._loop_thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._connect(timeout), loop).result(timeout + 5)
        except BaseException as error:
            self._stop_everything()
            description = getattr(error, "description", None)
            if type(error).__module__.startswith("nats.js") and description:
                raise ShmfeedError(
                    f"shmfeed: NATS at {_redacted(self.url)} refused the bridge's JetStream request: "
                    f"{str(description)[:200]}; check that JetStream is on (nats-server -js) and the stream's limits"
                ) from None
            if isinstance(error, (OSError, asyncio.TimeoutError)) or type(error).__module__.startswith("nats"):
                what, _, to_do = self._failures.describe(error).partition("; ")
                raise ShmfeedError(f"shmfeed: the bridge could not connect to NATS at {_redacted(self.url)}: "
                                   f"{what}; {to_do}") from None
            raise
        for bridged in self._feeds.values():
            bridged.reader.start()
            bridged.injector.start()
        if self.patterns:
            self._scanner = threading.Thread(target=self._scan, name="shmfeed-bridge-scan", daemon=True)
            self._scanner.start()
        if not self.durable:
            self._controller = threading.Thread(target=self._run_control, name="shmfeed-bridge-control", daemon=True)
            self._controller.start()
        self._status = _bridge_status.StatusPublisher(self)
        self._status.start()
        return self

    def _run_control(self) -> None:
        """Pause every feed while NATS is away, resume them when it is back (core mode)."""
        while True:
            command = self._control.get()
            if command is None:
                return
            for bridged in list(self._feeds.values()):
                try:
                    if command == "pause":
                        bridged.pause()
                    else:
                        bridged.resume()
                except (ShmfeedError, OSError) as error:  # its values keep being read and counted
                    print(f"shmfeed bridge: could not {command} feed {bridged.name!r}: {error}", file=sys.stderr)

    def _unbridged_matches(self) -> list[str]:
        """Feeds of the namespace that a pattern asks for and that are not bridged yet."""
        if not self.patterns:
            return []
        found = []
        for name in named_feeds(_names.current_namespace()):
            if name not in self._feeds and name not in found and any(matches(p, name) for p in self.patterns):
                try:
                    _names.validate_name(name, what="feed name")
                except ValueError:
                    continue
                found.append(name)
        return found

    def _scan(self) -> None:
        """The control plane (its own thread): bridge feeds opened since, every RESCAN_SECONDS."""
        while not self._stop_scanning.wait(RESCAN_SECONDS):
            for name in self._unbridged_matches():
                if self._stop_scanning.is_set():
                    return
                try:
                    self._add_feed(name)
                except Exception as error:  # tried again at the next scan
                    print(f"shmfeed bridge: could not bridge feed {name!r} yet: {error}", file=sys.stderr)

    def _add_feed(self, name: str) -> None:
        """Bridge one more feed while running: local subscription first, then NATS's."""
        loop = self._loop
        assert loop is not None
        bridged = _BridgedFeed(self, name)
        self._by_subject[bridged.subject] = bridged  # first: what NATS brings at once is queued
        try:
            if not self.durable:  # a durable bridge's consumer takes every subject of the realm
                asyncio.run_coroutine_threadsafe(self._subscribe(bridged), loop).result(10)
        except BaseException:
            del self._by_subject[bridged.subject]
            bridged.close_local()
            bridged.feed.detach()
            raise
        self._feeds[name] = bridged
        bridged.reader.start()
        bridged.injector.start()

    async def _connect(self, timeout: float) -> None:
        import nats

        self._outbound = asyncio.Queue()
        self._nc = await nats.connect(
            self.url, name=f"shmfeed-bridge {self.origin}", no_echo=True, connect_timeout=timeout,
            allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            error_cb=self._on_error, reconnected_cb=self._on_reconnected, disconnected_cb=self._on_disconnected,
            **nats_kwargs(self.url, self._connect_options),
        )
        if self.durable:
            js = self._nc.jetstream()
            await _bridge_durable.ensure_stream(js, self.realm, self.max_age, self.max_bytes)
            self._publisher = _bridge_durable.DurablePublisher(self, self.max_pending)
            await self._publisher.start()
            self._consumer = _bridge_durable.DurableConsumer(self, self.home, self._on_stream_message)
            await self._consumer.start()
        else:
            for bridged in self._feeds.values():
                await self._subscribe(bridged)
        await self._nc.flush(timeout)  # the server has our subscriptions: ready
        self._pump = asyncio.get_running_loop().create_task(self._publish_all())
        self._expiry = asyncio.get_running_loop().create_task(self._expire_partials())

    async def _subscribe(self, bridged: _BridgedFeed) -> None:
        """A core bridge's subscriptions to a feed: its subject, and the outboxes' under it
        (what durable bridges publish reaches core ones too)."""
        await self._nc.subscribe(bridged.subject, cb=self._on_message)
        await self._nc.subscribe(f"{bridged.subject}.*", cb=self._on_message)

    def close(self, timeout: float = 10.0) -> None:
        """Stop bridging: what the bridge's channels hold is published, what NATS already
        delivered to it is sent locally, then it disconnects. Idempotent."""
        if self._status is not None:
            self._status.stop()  # first: the monitor no longer shows a bridge that is closing
        with self._state_lock:
            if self._closed or not self._started:
                self._closed = True
                return
            self._closed = True
        self._stop_scanning.set()
        if self._scanner is not None:
            self._scanner.join(timeout)
        if self._controller is not None:
            self._control.put(None)
            self._controller.join(timeout)
        for bridged in self._feeds.values():
            if bridged.cursor is not None:  # durable: nothing reaches the outbox from now on
                try:
                    _bridge_outbox.stop_receiving(bridged.feed, bridged.subscription)
                except (ShmfeedError, OSError) as error:
                    print(f"shmfeed bridge: feed {bridged.name!r}: {error}", file=sys.stderr)
            bridged.close_local()
        self._reading.set()  # the readers read what is left, whether NATS is there or not
        for bridged in self._feeds.values():
            if bridged.reader.is_alive():
                bridged.reader.join(timeout)
        loop = self._loop
        if loop is not None and self._nc is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._drain(timeout), loop).result(timeout + 5)
            except Exception:
                pass  # NATS gone: what was not published is lost, as in any core-mode outage
            publisher = self._publisher
            if publisher is not None and publisher.pending():
                print(f"shmfeed bridge: closed with {publisher.pending()} messages JetStream had not acknowledged "
                      f"(NATS away for {timeout:g} s); they stay in the outboxes, for the next durable bridge "
                      f"of this namespace and realm to publish", file=sys.stderr, flush=True)
            elif publisher is not None:
                for bridged in self._feeds.values():  # all of it stored: the outboxes go
                    try:
                        _bridge_outbox.forget(bridged.feed, self.mark_key, bridged.channel)
                    except (ShmfeedError, OSError) as error:
                        print(f"shmfeed bridge: feed {bridged.name!r}: {error}", file=sys.stderr)
        for bridged in self._feeds.values():
            if bridged.injector.is_alive():
                bridged.inbound.put(None)
                bridged.injector.join(timeout)
        if loop is not None and self._nc is not None and self.durable:
            try:  # the acknowledgements of what the injectors delivered, then disconnect
                asyncio.run_coroutine_threadsafe(self._finish(timeout), loop).result(timeout + 5)
            except Exception:
                pass  # NATS gone: what was not acknowledged comes again; the marks skip it
        self._stop_everything()

    async def _drain(self, timeout: float) -> None:
        assert self._outbound is not None
        self._outbound.put_nowait(None)
        if self._pump is not None:
            await asyncio.wait_for(self._pump, timeout)
        if self._expiry is not None:
            self._expiry.cancel()
        if self._publisher is not None:  # what JetStream has not acknowledged yet
            await asyncio.wait_for(self._publisher.all_acknowledged(), timeout)
        if self._consumer is not None:
            await self._consumer.stop()  # no more fetches: what was fetched is delivered
        else:
            await asyncio.wait_for(self._nc.drain(), timeout)

    async def _finish(self, timeout: float) -> None:
        assert self._consumer is not None
        await asyncio.wait_for(self._consumer.acknowledged(), timeout)  # and flushed
        await self._nc.close()  # not drain(): what it would still fetch stays in the stream

    def _stop_everything(self) -> None:
        """Everything let go of, at close or when start() fails (the durable lock too)."""
        if self._status is not None:
            self._status.stop()
        loop = self._loop
        if loop is not None:
            if self._nc is not None and not self._nc.is_closed:
                try:
                    asyncio.run_coroutine_threadsafe(self._nc.close(), loop).result(5)
                except Exception:
                    pass
            if self._expiry is not None:
                loop.call_soon_threadsafe(self._expiry.cancel)
            if loop.is_running():
                try:  # what still waits for NATS (a resend, a probe): ended, not left pending
                    asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result(5)
                except Exception:
                    pass
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(5)
            if not loop.is_running():
                loop.close()
        for bridged in self._feeds.values():
            if not bridged.channel.closed:
                bridged.close_local()
            bridged.feed.detach()
        if self._lock_file is not None:
            _let_go(*self._lock_file)
            self._lock_file = None

    def __enter__(self) -> "Bridge":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- statistics ---------------------------------------------------------------------------

    def statistics(self) -> BridgeStatistics:
        """Counters of every bridged feed, and whether NATS is connected now."""
        nc = self._nc
        bridged_feeds = list(self._feeds.values())
        # Connected: NATS is, and every feed is subscribed again after an outage (core).
        connected = bool(nc is not None and nc.is_connected) and all(b.paused_at is None for b in bridged_feeds)
        feeds = tuple(bridged.statistics() for bridged in bridged_feeds)
        if not self.durable:
            return BridgeStatistics(self.origin, _redacted(self.url), connected, self._reconnects, feeds)
        consumer, publisher = self._consumer, self._publisher
        lag = None if consumer is None else consumer.lag + consumer.unapplied
        held = None if publisher is None else sum(_held_in(bridged.channel) for bridged in bridged_feeds)
        return BridgeStatistics(self.origin, _redacted(self.url), connected, self._reconnects, feeds,
                                "durable", lag, held)

    # --- the data path ---------------------------------------------------------------------

    def _hand_to_loop(self, bridged: _BridgedFeed, batch: list[bytes], places: list[tuple[int, int]] | None = None) -> None:
        """From a reader thread: queue values for publishing (one wake-up of the loop for
        the batch). Waits while the loop holds PUBLISH_BACKLOG unpublished batches: the
        bridge's channel then fills and the ring drops (counted) instead: the local send
        never waits."""
        loop, outbound = self._loop, self._outbound
        if loop is None or outbound is None or loop.is_closed():
            bridged.drop("disconnected", len(batch))
            return
        self._backlog.acquire()
        try:
            loop.call_soon_threadsafe(outbound.put_nowait, (bridged, batch, places))
        except RuntimeError:  # the loop was closed meanwhile
            self._backlog.release()
            bridged.drop("disconnected", len(batch))

    async def _publish_all(self) -> None:
        """The loop's publisher: each batch a reader handed over, in order: the small values
        packed into as few messages as ``max_payload`` allows, a large one alone or in parts
        (``_bridge_wire``)."""
        import nats.errors

        assert self._outbound is not None
        nc = self._nc
        while True:
            item = await self._outbound.get()
            if item is None:
                return
            bridged, batch, places = item
            self._backlog.release()
            if places is not None:
                batch, places = await self._not_stored(bridged, batch, places)
            whole, pack = bridged.envelopes(bridged.origin, self.home)
            extra = MSG_ID_ROOM if self._publisher is not None else 0
            single_room, pack_room = nc.max_payload - len(whole) - extra, nc.max_payload - len(pack) - extra
            start = 0
            while start < len(batch):
                data = batch[start]
                end = start + 1
                if len(data) > MAX_VALUE_BYTES:
                    bridged.drop("too_large")
                    start = end
                    continue
                size = _bridge_wire.packed_size(1, len(data))
                while end < len(batch) and end - start < _bridge_wire.MAX_PACK and \
                        size + 4 + len(batch[end]) <= pack_room:
                    size += 4 + len(batch[end])
                    end += 1
                try:
                    if end - start > 1:
                        messages = [_bridge_wire.packed(pack, batch[start:end])]
                    elif len(data) <= single_room:
                        messages = [whole + data]
                    else:
                        messages = self._parts(bridged, data, nc.max_payload, None if places is None else places[start][0])
                except OSError:
                    bridged.drop("publish_error")
                    start = end
                    continue
                count, first = end - start, start
                start = end
                if self._publisher is not None and places is not None:  # counted out once acknowledged
                    await self._publisher.publish(bridged, messages, count, places[first][0], places[end - 1][1])
                    continue
                if not nc.is_connected:
                    bridged.drop("disconnected", count)
                    continue
                try:
                    for message in messages:
                        await nc.publish(bridged.subject, message)
                except (nats.errors.Error, OSError):
                    bridged.drop("publish_error", count)  # parts already out are dropped whole by the receivers
                    continue
                bridged.count_out(count)

    async def _not_stored(self, bridged: _BridgedFeed, batch: list[bytes],
                          places: list[tuple[int, int]]) -> tuple[list[bytes], list[tuple[int, int]]]:
        """Durable: the values of a batch that JetStream does not hold yet. An outbox taken
        over from a killed bridge may hold values it published and JetStream stored, not
        yet acknowledged to it: JetStream's last message from the outbox says where to go
        on; those before are taken without publishing them again."""
        if bridged.stored_through is None:
            assert self._publisher is not None
            bridged.stored_through = await self._publisher.stored_through(bridged)
        skip = 0
        while skip < len(places) and places[skip][0] <= bridged.stored_through:
            skip += 1
        if skip:
            bridged.commit(places[skip - 1][1])
            bridged.count_out(skip)
        return batch[skip:], places[skip:]

    def _parts(self, bridged: _BridgedFeed, data: bytes, max_payload: int, sequence: int | None) -> list[bytes]:
        """``data`` as parts, each message (envelope and part) within ``max_payload``, to
        publish one after another: no other message of this bridge comes between them. The
        value's sequence: its index in a durable bridge's outbox (a successor publishing it
        again makes the same parts), else the bridge's count of split values."""
        type_name = bridged.type_name()
        origin = bridged.origin
        probe = _bridge_wire.part_prefix(origin, self.home, bridged.name, type_name, _bridge_wire.Part(0, 0, 0, 0))
        part_length = max_payload - len(probe) - (MSG_ID_ROOM if self._publisher is not None else 0)
        if part_length <= 0:
            raise OSError("shmfeed: the server's max_payload leaves no room for a part; "
                          "raise max_payload in the nats-server configuration")
        if sequence is None:
            self._sequence += 1
            sequence = self._sequence
        count = -(-len(data) // part_length)
        view = memoryview(data)
        return [_bridge_wire.part_prefix(origin, self.home, bridged.name, type_name,
                                         _bridge_wire.Part(sequence, index, count, len(data)))
                + view[index * part_length:(index + 1) * part_length]
                for index in range(count)]

    async def _on_message(self, msg: Any) -> None:
        """A core bridge's message (loop thread)."""
        self._route(msg, None)

    def _on_stream_message(self, msg: Any, sequence: int) -> None:
        """A durable bridge's message from its consumer, at stream ``sequence`` (loop thread)."""
        self._route(msg, sequence)

    def _bridged_on(self, subject: str) -> _BridgedFeed | None:
        """The bridged feed of a subject: the feed's, or an outbox's under it (a durable
        bridge publishes on ``<feed subject>.<origin>``)."""
        bridged = self._by_subject.get(subject)
        if bridged is None:
            bridged = self._by_subject.get(subject.rpartition(".")[0])
        return bridged

    def _route(self, msg: Any, sequence: int | None) -> None:
        """Check one message and queue its values (whole, packed, or joined from parts) for
        the feed's injector; a durable bridge's messages are acknowledged once their values
        are delivered, or at once if there is nothing to deliver."""
        bridged = self._bridged_on(msg.subject)
        if bridged is None:
            self._release([msg])  # a feed not bridged here: nobody here subscribes to it
            return
        payload: bytes = msg.data
        for known in (bridged.known_packed, bridged.known_envelope):  # most messages repeat one
            if known is not None and payload.startswith(known[0]):  # the common case, without a parse
                envelope = known[1]._replace(data=memoryview(payload)[len(known[0]):])
                break
        else:
            parsed = _bridge_wire.parse(payload)
            if parsed is None or parsed.feed != bridged.name:
                bridged.drop("bad_message")  # not a bridge's, or another feed's (a forged subject)
                self._release([msg])
                return
            envelope = parsed
            if envelope.part is None:
                prefix = (payload[:len(payload) - len(envelope.data)], envelope)
                if envelope.packed:
                    bridged.known_packed = prefix
                else:
                    bridged.known_envelope = prefix
        origin = envelope.origin
        if origin == self.origin or (sequence is not None and envelope.home == self.home):
            self._release([msg])  # our own (core: no_echo spares us this; durable: the stream has it)
            return
        if envelope.part is not None:
            joined = self._join(bridged, envelope, msg)
            if joined is not None:
                data, messages = joined
                self._queue(bridged, [data], envelope.type_name, messages, sequence)
            return
        if origin in bridged.partials:
            self._abandon(bridged, origin, "incomplete")  # a whole value came: a part was lost
        if not envelope.packed:
            self._queue(bridged, [bytes(envelope.data)], envelope.type_name, [msg], sequence)
            return
        values = _bridge_wire.unpack(envelope.data)
        if values is None:
            bridged.drop("bad_message")
            self._release([msg])
            return
        self._queue(bridged, values, envelope.type_name, [msg], sequence)

    def _queue(self, bridged: _BridgedFeed, values: list[bytes], type_name: str, messages: list[Any],
               sequence: int | None) -> None:
        """Values of one message (or joined from one value's parts) for the injector. A
        durable bridge marks each by its message's stream sequence and its place in the
        message; the message is acknowledged with the last of them (acknowledged with an
        earlier one, a bridge killed between them would never get the rest again)."""
        last = len(values) - 1
        for index, data in enumerate(values):
            applying = None
            if sequence is not None:
                applying = _bridge_durable.Applying(sequence * _bridge_durable.SEQUENCE_SPAN + index,
                                                    messages if index == last else [])
            bridged.arrived(data, type_name, applying)
            if self._consumer is not None:
                self._consumer.taken()

    def _release(self, messages: list[Any]) -> None:
        """Messages with nothing (more) to deliver: a durable bridge acknowledges them."""
        if self._consumer is not None:
            self._consumer.ack(messages)

    def _applied(self, messages: list[Any], values: int) -> None:
        """From an injector: ``values`` durable values were delivered (or dropped):
        acknowledge the messages they came in."""
        loop, consumer = self._loop, self._consumer
        if loop is None or consumer is None:
            return
        try:
            loop.call_soon_threadsafe(consumer.applied, messages, values)
        except RuntimeError:
            pass  # the loop is closed: the stream delivers it again and the marks skip it

    def _join(self, bridged: _BridgedFeed, envelope: _bridge_wire.Envelope,
              msg: Any) -> tuple[bytes, list[Any]] | None:
        """One part of a split value (loop thread): the whole value and the messages it
        came in once its last part is here, else None. A part that does not follow the one
        before drops the value."""
        assert envelope.part is not None
        origin, data, type_name = envelope.origin, envelope.data, envelope.type_name
        sequence, index, count, size = envelope.part
        partial = bridged.partials.get(origin)
        if partial is not None and (partial.sequence != sequence or index != len(partial.parts)):
            # Parts of one origin come in order, one value after the other: this one is not
            # the next, so the value being joined lost a part.
            self._abandon(bridged, origin, "incomplete")
            partial = None
        if partial is None and bridged.passing_over.get(origin) == sequence:
            self._release([msg])
            return None  # a later part of a value dropped already
        if partial is None:
            reason = None
            part_length = len(data)
            if size > MAX_VALUE_BYTES or not (2 <= count and 0 < part_length < size
                                              and count == -(-size // part_length)):
                reason = "bad_part"
            elif index != 0:  # its first part was lost
                reason = "incomplete"
            elif self._partial_bytes + size > PARTIAL_BYTES_CAP or self._partial_count >= MAX_PARTIALS:
                reason = "incomplete"
            if reason is not None:
                bridged.drop(reason)
                self._release([msg])
                self._pass_over(bridged, origin, sequence)
                return None
            # The whole size is reserved now: what is held never passes the cap.
            self._partial_bytes += size
            self._partial_count += 1
            bridged.partials[origin] = _Partial(sequence, count, size, part_length, type_name, time.monotonic(),
                                                [bytes(data)], [msg] if self._consumer is not None else [])
            return None
        last = index == partial.count - 1
        expected = partial.size - partial.part_length * (partial.count - 1) if last else partial.part_length
        if (count, size, type_name, len(data)) != (partial.count, partial.size, partial.type_name, expected):
            self._abandon(bridged, origin, "bad_part")
            self._release([msg])
            return None
        partial.parts.append(bytes(data))
        if self._consumer is not None:
            partial.messages.append(msg)
        if not last:
            return None
        del bridged.partials[origin]
        self._partial_bytes -= partial.size
        self._partial_count -= 1
        return b"".join(partial.parts), partial.messages or [msg]

    def _abandon(self, bridged: _BridgedFeed, origin: str, reason: str) -> None:
        """Drop the value being joined from ``origin`` (counted once, as ``reason``); its
        later parts are passed over."""
        partial = bridged.partials.pop(origin)
        self._partial_bytes -= partial.size
        self._partial_count -= 1
        bridged.drop(reason)
        self._release(partial.messages)
        self._pass_over(bridged, origin, partial.sequence)

    @staticmethod
    def _pass_over(bridged: _BridgedFeed, origin: str, sequence: int) -> None:
        if len(bridged.passing_over) >= MAX_PARTIALS:
            bridged.passing_over.clear()  # forged origins must not grow it: forgetting costs a count
        bridged.passing_over[origin] = sequence

    async def _expire_partials(self) -> None:
        """Drop split values that take over ``join_timeout`` to arrive whole."""
        while True:
            await asyncio.sleep(max(0.05, self.join_timeout / 4))
            if self._publisher is not None:
                self._publisher.check_acks()
            oldest = time.monotonic() - self.join_timeout
            for bridged in list(self._feeds.values()):  # the scan thread may add one meanwhile
                for origin, partial in list(bridged.partials.items()):
                    if partial.started < oldest:
                        self._abandon(bridged, origin, "incomplete")

    async def _on_error(self, error: Exception) -> None:
        import nats.errors

        if isinstance(error, nats.errors.SlowConsumerError):
            bridged = self._bridged_on(getattr(error, "subject", ""))
            if bridged is not None:
                bridged.drop("slow_consumer")
        else:  # at every reconnection attempt: said once per kind per outage; start() says its own
            self._failures.failed(error, announce=self._nc is not None and not self._closed)

    async def _on_disconnected(self) -> None:
        # nats-py calls this once per lost connection (and on close: not news then).
        if self._publisher is not None:
            self._publisher.on_disconnected()
            if not self._closed:
                self._reading.clear()
        elif not self._closed:
            self._control.put("pause")
        if not self._closed and not self._down:
            self._down = True
            meanwhile = (f"values meanwhile are held, up to {self.max_pending} per feed" if self.durable
                         else "values meanwhile are dropped and counted")
            print(f"shmfeed bridge: disconnected from {self._server_now()}; reconnecting ({meanwhile})",
                  file=sys.stderr, flush=True)

    async def _on_reconnected(self) -> None:
        self._failures.recovered()
        self._reconnects += 1
        if self._publisher is None:
            self._control.put("resume")
        if self._publisher is not None:
            self._publisher.on_reconnected()
            self._reading.set()
        if self._consumer is not None:
            self._consumer.remake.set()  # from its acknowledgement floor: what was lost comes again
        self._down = False
        if not self._closed:
            print(f"shmfeed bridge: reconnected to {self._server_now()}", file=sys.stderr, flush=True)

    def _server_now(self) -> str:
        """The server the connection is (or was last) on, with no credentials."""
        url = getattr(self._nc, "connected_url", None)
        if url is None or not getattr(url, "hostname", None):
            return _redacted(self.url)
        return f"{url.scheme or 'nats'}://{url.hostname}:{url.port or 4222}"


def _held_in(outbox: Channel[Any]) -> int:
    try:
        return len(outbox)
    except (ShmfeedError, OSError, ValueError):
        return 0  # let go of meanwhile (closing)


def _is_value_of(payload: bytes, type_name: str) -> bool:
    """Whether bytes from the wire are a value of type ``type_name`` that may be sent here:
    they decode, and hold no reference to a host's memory (a forged one would name ours).
    A value of a type this process does not know passes: the local receivers know it or
    say so, as they would for a local send."""
    if holds_local_reference(payload):
        return False
    try:
        value = _codec.decode(payload)
    except UnknownTypeError:
        return True
    except Exception:
        return False
    return _codec.type_name(type(value)) == type_name


def _one_durable_bridge(realm: str) -> tuple[int, str]:
    """Hold the lock that makes this the one durable bridge of this namespace and realm
    (they would share one consumer): its descriptor (closed, so let go, at close or death)
    and path. The file is removed at close (``_let_go``): a lock taken on a file another
    bridge removed meanwhile is taken again on the file that is there."""
    import fcntl

    path = _bridge_status.durable_lock_path(_names.current_namespace(), realm)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ShmfeedError(f"shmfeed: another durable bridge of namespace {_names.current_namespace()!r} and "
                               f"realm {realm!r} runs; stop it first (one durable bridge per namespace and realm)"
                               ) from None
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(descriptor).st_ino:
                return descriptor, path
        except FileNotFoundError:
            pass
        os.close(descriptor)  # removed by a bridge that closed meanwhile: lock the new one


def _let_go(descriptor: int, path: str) -> None:
    """Remove the lock file, then let go of the lock (in this order: a bridge waiting for
    it then finds the file gone and makes a new one)."""
    _shm.remove_file(path)
    os.close(descriptor)


async def _cancel_the_rest() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _quiet_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's handler of errors nobody awaited (inside nats-py, mostly at a lost
    connection or at close): one line on stderr, never a traceback; a cancellation is
    not news."""
    error = context.get("exception")
    if isinstance(error, asyncio.CancelledError):
        return
    what = f"{type(error).__name__}: {error}" if error is not None else context.get("message", "")
    print(f"shmfeed bridge: {_redacted(str(what))[:300]}", file=sys.stderr, flush=True)
