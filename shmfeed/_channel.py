"""``Channel``: the carrier of events, one ring in shared memory usable from any process."""

from __future__ import annotations

import struct
import time
import warnings
from typing import Any, AsyncIterator, Generic, Iterable, Iterator, TypeVar, overload

from . import _codec, _names, _registry_client, _ring, _waker
from . import _layout as L
from ._errors import ChannelClosed, ChannelCorruptError, ChannelEmpty, ChannelFull, FeedTypeError, UnknownTypeError
from ._stats import ChannelStatistics

_DECODE_ERRORS = (ChannelCorruptError, UnknownTypeError)  # what a value that cannot be decoded raises
_NOTHING = object()  # what ChannelCore.take_common answers when a receive is not that simple
_DECODE = _codec.decode_with_msgpack  # take_common's decode of a value the C decoder leaves
_BATCH_UNPACK, _BATCH_OPTIONS = _codec.BATCH_DECODE  # (see recv_many)

T = TypeVar("T")

_REFERENCE = struct.Struct("<Q")
DEFAULT_CAPACITY = 1024


def display_type(type_name: str) -> str:
    """A type name as users write it: ``int`` rather than ``builtins.int``."""
    return type_name[9:] if type_name.startswith("builtins.") else type_name


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            raise TypeError(f"shmfeed: timeout must be a number or None, got {type(timeout).__name__}; pass seconds")
        if timeout != timeout:
            raise ValueError("shmfeed: timeout must not be NaN; pass seconds, or None to wait for ever")


class TypeArgument:
    """Lets ``Cls[int]()`` fix the element type at run time, as ``elem_type=int`` does.

    ``typing`` assigns ``__orig_class__`` on the new instance after ``__init__``; this
    property catches that assignment and hands the type argument to the class.
    """

    __slots__ = ()

    @property
    def __orig_class__(self) -> Any:
        raise AttributeError("__orig_class__")

    @__orig_class__.setter
    def __orig_class__(self, alias: Any) -> None:
        args: tuple[Any, ...] = getattr(alias, "__args__", ())
        if len(args) == 1 and isinstance(args[0], type):
            self._apply_type_argument(args[0])

    def _apply_type_argument(self, elem_type: type) -> None:
        raise NotImplementedError


class Channel(TypeArgument, Generic[T]):
    """A channel whose buffer is a ring in POSIX shared memory.

    Any process that holds the channel (passed as a ``Process``/``Pool`` argument, pickled,
    or received inside an event) can send to it and receive from it. Several receivers
    make a work queue: each value goes to exactly one of them. Values from one sender are
    received in the order sent.

    ``Channel(64)`` (an int first) is a channel of capacity 64, as ``queue.Queue(64)`` is;
    ``Channel(int)`` (a type first) is a channel of ints. ``Channel(64, capacity=8)`` gives
    the capacity twice and is a ``TypeError``.

    Args:
        elem_type: if given, only values whose type is exactly this are accepted, and a
            Feed it is subscribed to is fixed to this type. ``Channel[int]()`` does the same.
            An ``int`` here (not a ``bool``) is the capacity instead.
        capacity: how many values it holds before a sender blocks (default 1024).
        buffer_size: bytes of ring; default 512 per value of capacity (64 KiB at least).
            Values larger than a quarter of it travel as files in /dev/shm.
        overflow: what a sender does when the channel is full: ``"block"`` (wait),
            ``"drop_newest"`` (skip this value), ``"drop_oldest"`` (discard the oldest
            waiting value) or ``"evict"`` (a Feed ends this channel's subscriptions with
            ``SlowSubscriberError``; a direct ``send`` waits).
        name: a label for people, nothing more: shown by ``shmfeed monitor``, in ``repr``
            and as ``channel.name`` in every process that holds the channel. At most
            ``CHANNEL_NAME_MAX`` (128) bytes of UTF-8, printable characters only. It
            names no shared object: two channels may carry one label.

    Raises:
        TypeError: ``elem_type`` is neither a type, None nor an int; the capacity was
            given twice; ``name`` is not a str.
        ValueError: a capacity below 1, a bad ``buffer_size`` or ``overflow``, or a
            ``name`` that is empty, too long or unprintable.
        SharedObjectError: /dev/shm has no room for the ring (errno ENOSPC).

    A Channel is a context manager that closes it on exit.
    """

    __slots__ = ("_core", "_namespace", "_channel_id", "_elem_type", "_elem_type_name", "_label", "_held_error",
                 "__weakref__")
    _held_error: ChannelCorruptError | UnknownTypeError | None  # see recv_many

    @overload
    def __init__(
        self: "Channel[Any]",
        elem_type: int,
        *,
        buffer_size: int | None = None,
        overflow: str = "block",
        name: str | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        elem_type: type[T] | None = None,
        capacity: int | None = None,
        *,
        buffer_size: int | None = None,
        overflow: str = "block",
        name: str | None = None,
    ) -> None: ...

    def __init__(
        self,
        elem_type: type[T] | int | None = None,
        capacity: int | None = None,
        *,
        buffer_size: int | None = None,
        overflow: str = "block",
        name: str | None = None,
    ) -> None:
        if isinstance(elem_type, int) and not isinstance(elem_type, bool):
            # Channel(64): a capacity first, as queue.Queue(64).
            if capacity is not None:
                raise TypeError(
                    f"shmfeed: Channel() got the capacity twice ({elem_type!r} first, and capacity={capacity!r}); "
                    f"give it once: Channel({elem_type!r}) or Channel(capacity={capacity!r})"
                )
            elem_type, capacity = None, elem_type
        if elem_type is not None and not isinstance(elem_type, type):
            raise TypeError(
                f"shmfeed: Channel()'s first argument must be a type (typed channel), an int (capacity) "
                f"or None, got {elem_type!r}; write Channel(int) for ints, Channel(64) for a capacity of 64"
            )
        if capacity is None:
            capacity = DEFAULT_CAPACITY
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"shmfeed: capacity must be an int >= 1, got {capacity!r}")
        if buffer_size is None:
            ring_bytes = _ring.default_ring_bytes(capacity)
        elif not isinstance(buffer_size, int) or isinstance(buffer_size, bool) or buffer_size < _ring.MIN_RING_BYTES:
            raise ValueError(f"shmfeed: buffer_size must be an int >= {_ring.MIN_RING_BYTES}, got {buffer_size!r}")
        else:
            ring_bytes = (buffer_size + 7) // 8 * 8
        if overflow not in _ring.OVERFLOW_CODES:
            raise ValueError(f"shmfeed: overflow must be one of {', '.join(_ring.OVERFLOW_POLICIES)}; got {overflow!r}")
        if name is not None:
            _names.validate_name(name, what="channel name", limit=L.CHANNEL_NAME_MAX)
            if len(name.encode()) > L.CHANNEL_NAME_MAX:
                raise ValueError(
                    f"shmfeed: channel name must be at most {L.CHANNEL_NAME_MAX} bytes of UTF-8, "
                    f"got {len(name.encode())}; use a shorter label"
                )
        self._namespace = _names.current_namespace()
        self._elem_type = elem_type
        self._elem_type_name = _codec.type_name(elem_type) if elem_type is not None else ""
        self._label = name
        self._held_error = None
        self._core: _ring.ChannelCore | None = _ring.ChannelCore.create(
            self._namespace, capacity, ring_bytes, overflow, self._elem_type_name, label=name
        )
        self._core.hold()
        self._channel_id = self._core.channel_id
        _registry_client.ensure_running(self._namespace)

    @classmethod
    def _error_channel(cls) -> "Channel[Any]":
        """A subscription's error channel: one slot, a small ring, hidden by the monitor."""
        return cls._private(1, _ring.MIN_RING_BYTES, "block", L.FLAG_ERROR_CHANNEL, None)

    @classmethod
    def _private(cls, capacity: int, ring_bytes: int, overflow: str, flags: int, label: str | None) -> "Channel[Any]":
        """A channel of the library's own, with ``flags`` (``_layout.CHANNEL_FLAGS``)."""
        channel = cls.__new__(cls)
        channel._namespace = _names.current_namespace()
        channel._elem_type = None
        channel._elem_type_name = ""
        channel._label = label
        channel._held_error = None
        channel._core = _ring.ChannelCore.create(
            channel._namespace, capacity, ring_bytes, overflow, "", flags=flags, label=label
        )
        channel._core.hold()
        channel._channel_id = channel._core.channel_id
        return channel

    @classmethod
    def _from_id(cls, namespace: str, channel_id: int) -> "Channel[Any]":
        """A handle on an existing channel; a closed stand-in if it no longer exists."""
        channel = cls.__new__(cls)
        channel._namespace = namespace
        channel._channel_id = channel_id
        channel._held_error = None
        channel._core = _ring.ChannelCore.open(namespace, channel_id)
        if channel._core is not None:
            channel._core.hold()
            channel._core.count_in_flight(-1)
        channel._elem_type = None
        channel._elem_type_name = channel._core.elem_type_name if channel._core is not None else ""
        channel._label = _label_of(channel._core) if channel._core is not None else None
        return channel

    def _apply_type_argument(self, elem_type: type) -> None:
        if self._elem_type_name == "":
            self._set_elem_type(elem_type)

    def _set_elem_type(self, elem_type: type) -> None:
        core = self._live_core()
        self._elem_type = elem_type
        self._elem_type_name = _codec.type_name(elem_type)
        core.acquire()
        try:
            core.words[L.ELEM_TYPE_LEN] = L.write_text(
                core.buffer, L.TYPE_NAME_OFFSET, L.TYPE_NAME_MAX, self._elem_type_name
            )
        finally:
            core.release_lock()
        core.elem_type_name = self._elem_type_name

    # --- properties ----------------------------------------------------------------------

    @property
    def elem_type(self) -> type | None:
        """The element type, or None for an untyped channel."""
        if self._elem_type is None and self._elem_type_name:
            self._elem_type = _codec.resolve_type(self._elem_type_name)
        return self._elem_type

    @property
    def name(self) -> str | None:
        """The channel's label (``Channel(name=...)``), or None: the same in every process."""
        return self._label

    @property
    def capacity(self) -> int:
        """How many values the channel holds before senders wait."""
        return self._live_core().capacity

    @property
    def overflow(self) -> str:
        return self._live_core().overflow

    @property
    def closed(self) -> bool:
        """True once any process closed the channel."""
        return self._core is None or self._core.closed

    def _live_core(self) -> _ring.ChannelCore:
        core = self._core
        if core is None or core.released:
            raise ChannelClosed(f"shmfeed: channel {self._channel_id:016x} no longer exists; use another channel")
        if core.refused is not None:
            core.check_usable()
        return core

    # --- sending and receiving -----------------------------------------------------------

    def send(self, value: T, timeout: float | None = None) -> None:
        """Put one value in the channel, waiting while it is full.

        ``timeout`` bounds the whole call, including a wait for the channel's send lock
        while another process holds it (a sender copying a large value, say).

        Raises:
            FeedTypeError: the channel is typed and ``type(value)`` is not its type.
            EncodingError: the value cannot be encoded (a TypeError; nothing was sent).
            TimeoutError: still full, or its send lock still held by another process,
                after ``timeout`` seconds; the value was not sent.
            ChannelClosed: the channel is closed.
        """
        _check_timeout(timeout)
        core, payload = self._encode(value)
        core.put(payload, timeout)

    def _encode(self, value: Any) -> tuple[_ring.ChannelCore, _ring.Encoded]:
        """Check ``value``'s type and encode it for this channel's ring."""
        self._check_type(type(value))
        core = self._live_core()
        payload = _codec.encode_for_send(value, core.large_values)
        core.large_values = len(payload) > _codec.LARGE_OUTPUT
        return core, payload

    def _check_type(self, tp: type) -> None:
        """Raise ``FeedTypeError`` if this channel's values are not of type ``tp``."""
        if self._elem_type_name and _codec.type_name(tp) != self._elem_type_name:
            raise FeedTypeError("Send", display_type(_codec.type_name(tp)), display_type(self._elem_type_name))

    def send_many(self, values: Iterable[T], timeout: float | None = None) -> None:
        """Put every value of ``values`` in the channel, in order, waiting while it is full:
        as many :meth:`send` calls, paid as one (a batch of small values costs less each).

        Every value is checked and encoded before the first is sent: a value of the wrong
        type, or one that cannot be encoded, raises and nothing is sent. ``timeout``
        bounds the whole call.

        Raises:
            FeedTypeError, EncodingError: as :meth:`send`; nothing was sent.
            TimeoutError: the channel stayed full (or its send lock held) until ``timeout``;
                the values before the one it names were sent, in order (``error.sent``
                says how many), the others were not.
            ChannelClosed: the channel is closed (``error.sent`` values were sent before).
        """
        _check_timeout(timeout)
        values = list(values)
        for tp in set(map(type, values)):
            self._check_type(tp)
        core = self._live_core()
        payloads = _codec.encode_many(values)  # each kept whole: a batch holds them all at once
        deadline = None if timeout is None else time.monotonic() + timeout
        for sent, payload in enumerate(payloads):
            try:
                core.put(payload, None if deadline is None else max(0.0, deadline - time.monotonic()))
            except TimeoutError as error:
                partial = TimeoutError(f"shmfeed: send_many on channel {core.channel_id:016x} sent {sent} of "
                                       f"{len(payloads)} values in {timeout} s (still full); the rest were not sent: "
                                       f"send them again, or give a longer timeout")
                partial.sent = sent  # type: ignore[attr-defined]
                raise partial from error
            except ChannelClosed as error:
                error.sent = sent  # type: ignore[attr-defined]
                raise

    def send_nowait(self, value: T) -> None:
        """Put one value in the channel if it has room now; never waits for room.

        As ``queue.Queue.put_nowait``. The channel's overflow policy applies as in
        :meth:`send` (``"drop_newest"`` drops the value silently, ``"drop_oldest"`` makes
        room). A wait for the send lock while another process copies a value in is not a
        wait for room: that lock is held only for the copy.

        Raises:
            ChannelFull: (a ``queue.Full``) the channel is full; nothing was sent.
            FeedTypeError: the channel is typed and ``type(value)`` is not its type.
            EncodingError: the value cannot be encoded (a TypeError; nothing was sent).
            ChannelClosed: the channel is closed.
        """
        core, payload = self._encode(value)
        if core.put_nowait(payload) == _ring.FULL:
            raise ChannelFull(
                f"shmfeed: channel {self._channel_id:016x} is full ({core.capacity} values or its "
                f"ring's bytes); receive from it first, or use send()/send_async() to wait for room"
            )

    async def send_async(self, value: T, timeout: float | None = None) -> None:
        """Like :meth:`send`, for asyncio code: waits for room without blocking the event loop.

        The value is written by this coroutine in the event loop's thread, between two
        awaits: a cancelled ``send_async`` either sent the value (completely, when it was
        written before the cancellation arrived) or did not send it at all; it never
        sends it twice. As with :meth:`recv_async`, a wait for the channel's send lock
        while another process holds it (only for a copy) blocks the loop, up to ``timeout``.

        Raises:
            FeedTypeError: the channel is typed and ``type(value)`` is not its type.
            EncodingError: the value cannot be encoded (a TypeError; nothing was sent).
            TimeoutError: still full after ``timeout`` seconds; the value was not sent.
            ChannelClosed: the channel is closed.
        """
        _check_timeout(timeout)
        core, payload = self._encode(value)
        deadline = None if timeout is None else time.monotonic() + timeout
        kind, record = core.record_for(payload)
        outcome = _ring.FULL
        try:
            outcome = core.offer_fast(record, deadline, None, kind)
            if outcome == _ring.FULL:
                outcome = await _offer_async(core, kind, record, deadline, timeout)
        finally:
            if kind == _ring.KIND_SPILL and outcome != _ring.DELIVERED and not _ring.delivered_despite():
                core._unlink_spill_record(record)  # not in the ring: its link goes
        if outcome == _ring.CLOSED:
            raise ChannelClosed(f"shmfeed: send on closed channel {core.channel_id:016x}; a closed channel stays closed")

    def recv(self, timeout: float | None = None) -> T:
        """Take one value, waiting until one arrives.

        ``timeout=0`` polls. Values of one sender come in the order sent. ``timeout`` bounds
        the whole call, including a wait for the receive lock while another process holds it.

        Raises:
            TimeoutError: nothing arrived, or the receive lock stayed held by another
                process, within ``timeout`` seconds; nothing was taken.
            ChannelClosed: the channel is closed and drained.
            ChannelCorruptError: the ring held bytes that are not a valid message.
        """
        core = self._core
        if timeout is None and self._held_error is None and core is not None and core.refused is None \
                and not core.released and core._fast is not None:
            # The common value in one C call: ChannelCore.take_common's steps, inline (a
            # call less on every receive).
            value = core._fast.take_one(_ring._pid, _NOTHING, _DECODE, core)
            if value is not _NOTHING:
                core._taken_since_empty += 1
            else:
                value = _codec.decode(core.take(None))
            return value  # type: ignore[no-any-return]
        if timeout is not None:
            _check_timeout(timeout)
        if self._held_error is not None:
            self._raise_held_error()
        core = self._live_core()
        value = core.take_common(_NOTHING, _DECODE)
        if value is _NOTHING:
            value = _codec.decode(core.take(timeout))
        return value  # type: ignore[no-any-return]

    def recv_many(self, max_items: int = 256, timeout: float | None = None) -> list[T]:
        """Take up to ``max_items`` values: waits (up to ``timeout``) for the first as
        :meth:`recv` does, then takes what else is waiting now, in order, without waiting
        for more. One call for many values: one wake-up and one Python call per batch.

        A value that cannot be decoded (see :meth:`recv`) after others were taken ends the
        batch: the values taken so far are returned and its error is raised by the next
        receive on this object, so nothing is lost and errors come in order.

        Raises:
            TimeoutError: nothing arrived within ``timeout`` seconds.
            ChannelClosed: the channel is closed and drained (nothing was taken).
            ChannelCorruptError, UnknownTypeError: as :meth:`recv`, for the first value.
        """
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"shmfeed: max_items must be a positive int, not {max_items!r}; give how many values "
                             f"one call may return")
        if timeout is not None:
            _check_timeout(timeout)
        self._raise_held_error()
        core = self._live_core()
        first = core.take_common(_NOTHING, _DECODE)
        values: list[T] = [_codec.decode(core.take(timeout)) if first is _NOTHING else first]  # type: ignore[list-item]
        fast = core._fast
        if fast is not None and max_items > 1:
            # The C batch: the inline values at the front, decoded and taken under one hold
            # of the receive lock; it stops where the Python poll is needed, or before a
            # value that does not decode (the loop below meets it and holds its error, as
            # _codec.decode words it: the batch's decode is msgpack's own, without that).
            more = fast.take_decoded(_ring._pid, max_items - 1, _BATCH_UNPACK, Exception, _BATCH_OPTIONS)
            if more:
                values += more
                core._taken_since_empty += len(more)  # a drain of many: see _should_yield
                if core.words[L.SEND_WAITING]:
                    core._wake(L.SEND_WAITLIST_WORD, L.SEND_WAITING)
        while len(values) < max_items:
            try:
                data = core.poll_fast(None)
            except ChannelClosed:
                break  # drained: the next receive says so
            if data is None:
                break
            try:
                values.append(_codec.decode(data))  # type: ignore[arg-type]
            except _DECODE_ERRORS as error:
                self._held_error = error
                break
        return values

    def _raise_held_error(self) -> None:
        """The decoding error ``recv_many`` kept for the next receive, if any."""
        error = self._held_error
        if error is not None:
            self._held_error = None
            raise error

    def recv_view(self, timeout: float | None = None) -> Any:
        """Take one value like :meth:`recv`, but a large ``bytes``, ``bytearray`` or NumPy
        array comes without a copy: as a read-only ``memoryview`` (or a read-only array) of
        the mapped file it travelled in. Use it as any buffer; ``bytes(view)`` copies it.

        Lifetime: the file stays the value's for as long as the view, or anything made
        from it (slices, ``numpy.frombuffer``, arrays), is referenced; when the last of
        them is gone the file is given back to the sender. Nothing kept can see other
        bytes. ``with channel.recv_view() as view:`` releases a memoryview at the end of
        the block; an array is let go of when it is no longer referenced.

        Values that travelled inline in the ring (those up to a quarter of its size: make
        the channel's ``buffer_size`` smaller to have large ones spill), other types, and
        a process without the C accelerator, get the value decoded as by :meth:`recv`
        (bytes-like values as a read-only memoryview of a copy). Raises as :meth:`recv`.
        """
        if timeout is not None:
            _check_timeout(timeout)
        if self._held_error is not None:
            self._raise_held_error()
        core = self._live_core()
        with _ring.pinning():
            data = core.take(timeout)
        return _codec.decode_as_view(data)

    def recv_nowait(self) -> T:
        """Take one value if one is waiting now; never waits for one.

        As ``queue.Queue.get_nowait``. A wait for the receive lock while another receiver
        takes a value is not a wait for a value: that lock is held only while one is taken.

        Raises:
            ChannelEmpty: (a ``queue.Empty``) nothing is waiting; nothing was taken.
            ChannelClosed: the channel is closed and drained.
            ChannelCorruptError: the ring held bytes that are not a valid message.
        """
        self._raise_held_error()
        data = self._live_core().poll_fast(None)
        if data is None:
            raise ChannelEmpty(
                f"shmfeed: channel {self._channel_id:016x} is empty; use recv()/recv_async() to wait for a value"
            )
        return _codec.decode(data)  # type: ignore[return-value]

    async def recv_async(self, timeout: float | None = None) -> T:
        """Like :meth:`recv`, for asyncio code: waits without blocking the event loop.

        Cancelling the awaiting task loses no value: a value is taken only by this
        coroutine in the event loop's thread, after its last await, and then returned.
        A wait for the receive lock while another process holds it blocks the event loop,
        up to ``timeout``: that lock is held only while a value is taken.

        Raises:
            TimeoutError: nothing arrived within ``timeout`` seconds; nothing was taken.
            ChannelClosed: the channel is closed and drained.
            ChannelCorruptError: the ring held bytes that are not a valid message.
        """
        _check_timeout(timeout)
        self._raise_held_error()
        core = self._live_core()
        value = core.take_common(_NOTHING, _DECODE)  # the common value in one C call, before any await
        if value is not _NOTHING:
            return value  # type: ignore[no-any-return]
        deadline = None if timeout is None else time.monotonic() + timeout
        data = core.poll(None, deadline)
        if data is None:
            data = await _poll_async(core, deadline, timeout)
        return _codec.decode(data)  # type: ignore[return-value]

    def close(self) -> None:
        """Close the channel for every process.

        Senders then get ``ChannelClosed``; receivers get the values still waiting, then
        ``ChannelClosed``; the channel's feed subscriptions end. Closing twice is fine.
        """
        if self._core is not None and not self._core.released:
            self._core.close()

    def statistics(self) -> ChannelStatistics:
        """A snapshot of the channel's counters (see ``ChannelStatistics``)."""
        words = self._live_core().words
        return ChannelStatistics(
            sent=int(words[L.SENT]),
            received=int(words[L.RECEIVED]),
            dropped=int(words[L.DROPPED]),
            evicted=int(words[L.EVICTED]),
            waiting_senders=int(words[L.SEND_WAITING]),
            waiting_receivers=int(words[L.RECV_WAITING]),
            fill=max(0, int(words[L.SENT] - words[L.RECEIVED])),
            capacity=int(words[L.CAPACITY]),
            bytes_sent=int(words[L.WRITE_POS]),
            ring_bytes=int(words[L.RING_BYTES]),
            spilled=int(words[L.SPILLED]),
            closed=bool(words[L.CLOSED]),
        )

    # --- protocols -------------------------------------------------------------------------

    def __len__(self) -> int:
        core = self._core
        return 0 if core is None or core.released else core.pending()

    def __iter__(self) -> Iterator[T]:
        core = self._live_core()
        take, take_common, decode = core.take, core.take_common, _codec.decode
        while True:
            if self._held_error is not None:  # what a recv_many kept for the next receive
                self._raise_held_error()
            value = take_common(_NOTHING, _DECODE)
            if value is _NOTHING:
                try:
                    value = decode(take(None))
                except ChannelClosed:
                    return
            yield value

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.recv_async()
        except ChannelClosed:
            raise StopAsyncIteration from None

    def __del__(self) -> None:
        # A channel no process holds any more can never be read again: close it, so that
        # its subscriptions end instead of blocking their feeds' sends for good.
        core = getattr(self, "_core", None)
        if core is None:
            return
        self._core = None
        try:
            abandoned = core.let_go() and _ring.subscribed_here(core.namespace, core.channel_id)
        except Exception:  # noqa: BLE001 - at interpreter teardown modules may be half gone
            return
        if abandoned:
            warnings.warn(
                f"shmfeed: channel {self._channel_id:016x} was dropped while still subscribed "
                f"(no process holds it any more); it was closed and its subscriptions ended. "
                f"Unsubscribe or close it (a with block) when done with it",
                ResourceWarning,
                source=self,
            )

    def __enter__(self) -> "Channel[T]":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        core = self._core
        if core is not None and not core.released:
            core.count_in_flight(+1)  # held in flight until unpickled (see ChannelCore.let_go)
        return (_rebuild_channel, (self._namespace, self._channel_id))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Channel):
            return NotImplemented
        return (self._namespace, self._channel_id) == (other._namespace, other._channel_id)

    def __hash__(self) -> int:
        return hash((self._namespace, self._channel_id))

    def __repr__(self) -> str:
        kind = f"[{display_type(self._elem_type_name)}]" if self._elem_type_name else ""
        state = "closed" if self.closed else f"{len(self)} waiting"
        label = f" {self._label!r}" if self._label is not None else ""
        return f"<shmfeed.Channel{kind}{label} {self._channel_id:016x} {state}>"

    # --- select support ---------------------------------------------------------------------

    def _select_poll(self, waker: _waker.Waker | None, deadline: float | None = None) -> tuple[bool, Any]:
        data = self._live_core().poll(waker, deadline)
        if data is None:
            return False, None
        return True, _codec.decode(data)

    def _select_forget(self, waker: _waker.Waker) -> None:
        core = self._core
        if core is not None and not core.released:
            core.forget_receiver(waker)

    @property
    def _select_namespace(self) -> str:
        return self._namespace

    @property
    def _select_wait_list(self) -> tuple[str, str, int]:
        return ("recv", self._namespace, self._channel_id)


Channel.__module__ = "shmfeed"


async def _poll_async(core: _ring.ChannelCore, deadline: float | None, timeout: float | None) -> bytes | memoryview:
    """Wait in the event loop until ``core`` has a value; return its encoded bytes."""
    from . import _aio  # here, not at the top: most users (and the registry) never need asyncio

    def attempt(waker: _waker.Waker) -> tuple[bool, bytes | memoryview | None]:
        data = core.poll(waker, deadline)
        return data is not None, data

    def forget(waker: _waker.Waker) -> None:
        if not core.released:
            core.forget_receiver(waker)

    def expired() -> TimeoutError:
        return TimeoutError(f"shmfeed: nothing received on channel {core.channel_id:016x} in {timeout} s; "
                            f"wait longer (timeout=None waits for ever), or check that something sends to it")

    data = await _aio.wait_ready(core.namespace, attempt, [(receive_wait_list(core), forget)], deadline, expired)
    assert data is not None
    return data


async def _offer_async(
    core: _ring.ChannelCore, kind: int, record: _ring.Payload, deadline: float | None, timeout: float | None
) -> int:
    """Wait in the event loop until ``core`` takes ``record``; DELIVERED, DROPPED or CLOSED."""
    from . import _aio

    def attempt(waker: _waker.Waker) -> tuple[bool, int]:
        outcome = core.offer(kind, record, waker, deadline)
        return outcome != _ring.FULL, outcome

    def forget(waker: _waker.Waker) -> None:
        if not core.released:
            core.forget_sender(waker)

    def expired() -> TimeoutError:
        return TimeoutError(f"shmfeed: channel {core.channel_id:016x} stayed full for {timeout} s; nothing was sent")

    return await _aio.wait_ready(core.namespace, attempt, [(send_wait_list(core), forget)], deadline, expired)


def receive_wait_list(core: _ring.ChannelCore) -> tuple[str, str, int]:
    """The key by which ``_aio`` counts coroutines waiting to receive from ``core``."""
    return ("recv", core.namespace, core.channel_id)


def send_wait_list(core: _ring.ChannelCore) -> tuple[str, str, int]:
    """The key by which ``_aio`` counts coroutines waiting for room in ``core``."""
    return ("send", core.namespace, core.channel_id)


def _label_of(core: _ring.ChannelCore) -> str | None:
    """A channel's label as its creator stored it in the segment header (None: unnamed)."""
    length = int(core.words[L.CHANNEL_NAME_LEN])
    return L.read_text(core.buffer, L.CHANNEL_NAME_OFFSET, length, L.CHANNEL_NAME_MAX) if length else None


def _rebuild_channel(namespace: str, channel_id: int) -> Channel[Any]:
    return Channel._from_id(namespace, channel_id)


def _channel_to_bytes(channel: Channel[Any]) -> bytes:
    core = channel._core
    if core is not None and not core.released:
        core.count_in_flight(+1)  # as __reduce__
    return _REFERENCE.pack(channel._channel_id) + channel._namespace.encode()


def _channel_from_bytes(data: bytes) -> Channel[Any]:
    if len(data) < _REFERENCE.size:
        raise ValueError("channel reference too short")
    (channel_id,) = _REFERENCE.unpack_from(data)
    return Channel._from_id(data[_REFERENCE.size :].decode(), channel_id)


_codec.register_reference_type(Channel, _codec.CHANNEL_EXT_CODE, _channel_to_bytes, _channel_from_bytes)
