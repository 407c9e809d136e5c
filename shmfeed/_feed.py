"""``Feed``: one-to-many delivery to channels in any process, go-ethereum's ``event.Feed``.

The public ``Feed`` and ``FeedSubscription``, this process's registry of its subscriptions,
and what it does at exit and fork. The segment, its subscription table and the send are
``_feed_core.FeedCore``'s.
"""


from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Generic, Iterable, Iterator, Sequence, TypeVar

from . import _codec, _marks, _names, _process, _registry_client, _ring, _shm
from . import _layout as L
from ._channel import Channel, TypeArgument, _check_timeout, display_type
from ._errors import ChannelClosed, FeedClosed, FeedSendTimeout, FeedTypeError, ShmfeedError
from ._feed_core import FeedCore, _feeds
from ._loan import Loan
from ._stats import FeedStatistics, SubscriptionStatistics
from ._subscription import ErrorChannel, SharedErrorChannel, Subscription, select

T = TypeVar("T")


class FeedSubscription(Subscription):
    """The subscription ``Feed.subscribe`` returns."""

    def __init__(self, feed: FeedCore, channel: Channel[Any], entry: int, sub_id: int, err: Channel[Any]) -> None:
        self._feed = feed
        self._channel = channel
        self._entry = entry
        self._sub_id = sub_id
        self._err = SharedErrorChannel(err)
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        _subscriptions.add(self)

    def err(self) -> ErrorChannel:
        return self._err

    def unsubscribe(self) -> None:
        with self._lock:
            feed = self._feed
            if feed.released:
                return
            feed.end_subscription(
                self._entry, self._sub_id, self._channel._channel_id, self._err.channel._channel_id
            )
            self._err.channel.close()

    def __iter__(self) -> Iterator[Any]:
        """Receive the subscription's values until it ends: the consumer loop to write.

        ``for value in sub:`` yields what arrives on the subscribed channel. When the
        subscription ends (``feed.close()``, ``unsubscribe()``, the channel closed), the
        values already delivered are yielded and the loop stops; when it fails (for example
        ``SenderDiedError``), they are yielded and then that error is raised. A plain
        ``for value in channel:`` only stops when the channel itself is closed.
        """
        channel, err = self._channel, self._err
        while True:
            try:
                which, value = select(channel, err)
            except ChannelClosed:
                return
            if which is channel:
                yield value
                continue
            while True:  # ended: what was delivered before the end is still the consumer's
                try:
                    yield channel.recv(timeout=0)
                except (TimeoutError, ChannelClosed):
                    break
            if value is not None:
                raise value
            return

    def statistics(self) -> SubscriptionStatistics:
        feed = self._feed
        active = not feed.released and feed.is_active(self._entry, self._sub_id)
        try:
            channel = self._channel.statistics()
        except ChannelClosed:
            channel = None
        return SubscriptionStatistics(active=active, channel=channel)

    def __repr__(self) -> str:
        state = "active" if self.statistics().active else "ended"
        return f"<shmfeed.Subscription to feed {self._feed._label()} {state}>"


class Feed(TypeArgument, Generic[T]):
    """One-to-many delivery of values to channels in any process (go-ethereum's Feed).

    ``Feed()`` is ready to use at once. ``Feed("prices")`` opens or creates the feed of that
    name in this namespace: every process that opens ``"prices"`` gets the same feed. A Feed
    is picklable; the copy in another process is the same feed.

    A feed carries one type, fixed by the first ``send`` or by subscribing a typed channel
    (or by ``elem_type`` / ``Feed[int]()``). Types compare exactly.

    ``Feed()`` names its shared memory at once but creates it at first use, in whichever
    process uses it first: a Feed made before ``fork`` is one feed in the parent and every
    child, used before the fork or not.

    Used as a context manager (``with Feed("prices") as feed:``), the block's end is
    ``detach()``: this process is done with the feed, which goes on for everyone else.
    """

    def __init__(self, name: str | None = None, *, elem_type: type[T] | None = None) -> None:
        if name is not None:
            _names.validate_name(name, what="feed name", limit=L.FEED_NAME_MAX)
        if elem_type is not None and not isinstance(elem_type, type):
            raise TypeError(f"shmfeed: elem_type must be a type or None, got {elem_type!r}; pass a class such as int")
        self._name = name
        self._namespace = _names.current_namespace()
        # The key is chosen now, the segment made at first use: forked children that use
        # a Feed() made before the fork all find the same segment.
        self._key = (_names.named_feed_key(self._namespace, name, _shm.is_foreign) if name is not None else
                      _names.anonymous_feed_key(_names.new_id()))
        self._core: FeedCore | None = None
        self._elem_type_name = _codec.type_name(elem_type) if elem_type is not None else ""
        self._open_lock = threading.Lock()
        self._detached = False
        self._subscriptions: "weakref.WeakSet[FeedSubscription]" = weakref.WeakSet()
        if name is not None or elem_type is not None:
            self._open()

    def _apply_type_argument(self, elem_type: type) -> None:
        if not self._elem_type_name:
            self._elem_type_name = _codec.type_name(elem_type)
            core = self._open()
            core.acquire()
            try:
                core._fix_type_locked(self._elem_type_name, "Subscribe")
            finally:
                core.release_lock()

    def _open(self) -> FeedCore:
        core = self._core
        if core is not None:
            if not core.released:
                core.check_usable()
                return core
            # Released by release_namespace or at exit: do not create it again behind the
            # user's back (the process is going away, or the namespace was let go).
            raise FeedClosed(
                f"shmfeed: feed {core._label()} was released by this process; open it again with Feed(name)"
            )
        if self._detached:
            raise FeedClosed("shmfeed: this Feed object was detached; open the feed again to use it")
        with self._open_lock:
            core = self._core
            if core is None or core.released:
                core = self._core = FeedCore.open_or_create(self._namespace, self._key, self._name)
                core.users += 1
                _registry_client.ensure_running(self._namespace)
                if self._elem_type_name:
                    core.acquire()
                    try:
                        core._fix_type_locked(self._elem_type_name, "Subscribe")
                    finally:
                        core.release_lock()
        return core

    def _existing(self) -> FeedCore | None:
        """The feed's core if its segment exists; never creates it (for read-only calls)."""
        if self._core is not None or self._detached:
            return self._open()
        if FeedCore.exists(self._namespace, self._key):
            return self._open()
        return None

    @property
    def name(self) -> str | None:
        return self._name

    def subscribe(self, channel: Channel[T]) -> Subscription:
        """Deliver future sends to ``channel`` until the subscription is cancelled.

        New subscriptions take effect at the next send. Subscribing a channel k times
        delivers k copies.

        Raises:
            TypeError: ``channel`` is not a Channel.
            FeedTypeError: the channel is typed otherwise than the feed.
            FeedClosed: the feed was closed.
        """
        if not isinstance(channel, Channel):
            raise TypeError("event: Subscribe argument does not have sendable channel type")
        core = self._open()
        channel_core = channel._live_core()
        if channel_core.namespace != core.namespace:
            raise ValueError(
                "shmfeed: the channel and the feed live in different namespaces; make both in one namespace "
                "(SHMFEED_NAMESPACE, set_namespace)"
            )
        err = Channel._error_channel()
        try:
            entry, sub_id = core.add_subscription(channel_core, err._channel_id)
        except BaseException:
            err.close()
            raise
        subscription = FeedSubscription(core, channel, entry, sub_id, err)
        self._subscriptions.add(subscription)
        return subscription

    def send(self, value: T, timeout: float | None = None) -> int:
        """Deliver ``value`` to every subscribed channel, in whatever process it lives.

        Sends are serialized feed-wide: a send first waits for the feed's send lock (which
        another process's send may hold while it waits on a full channel), writes the value
        into every channel that has room, then waits while a subscriber's channel is full
        (unless its overflow policy says otherwise); an unsubscribe, or the end of the
        subscriber's process, releases that wait.

        ``timeout`` bounds all of it, so that a producer can bound its wait. A send that
        cannot finish in time raises ``FeedSendTimeout``: the channels that already got
        the value keep it (``delivered`` says how many), every other subscribed channel
        (``pending`` names them) never gets it from this send, and nothing of it is left
        behind. The feed's statistics count such a send only if it reached some channel,
        and then only those deliveries.

        Args:
            value: the value; its type must be the feed's (the first send fixes it).
            timeout: seconds to wait at most; None waits as long as it takes.

        Returns:
            How many channels the value was delivered to (channels that dropped it by
            their overflow policy, closed ones and evicted ones are not counted).

        Raises:
            FeedTypeError: ``type(value)`` is not the feed's type.
            EncodingError: the value cannot be encoded (a TypeError); nobody got it.
            FeedClosed: the feed was closed.
            FeedSendTimeout: (a ``TimeoutError``) the send could not finish within
                ``timeout`` seconds: a full channel, or a lock of the feed or of a channel
                held by another process.
        """
        core = self._core
        # The common send in few steps: a value of the type this feed's core took before
        # (type(value) is exact: a subclass's name differs), encoded by the C encoder, the
        # bytes _codec.encode would give; anything else takes the whole path below.
        if timeout is None and core is not None and type(value) is core.lane_type and not core.large_values \
                and not core.released:
            answer = core.send_value(value)
            if answer is not None:
                return answer
        deadline = None
        if timeout is not None:
            _check_timeout(timeout)
            deadline = time.monotonic() + timeout
        core, payload = self._prepare(value, deadline, timeout)
        return core.send(payload, deadline, timeout)

    def loan(self, size: int) -> "Loan":
        """A writable buffer of ``size`` bytes in shared memory, for one ``bytes`` value
        written in place and sent without a copy: write it into ``loan.buffer``, then
        ``loan.send(timeout=None)`` delivers it as :meth:`send` would (see :class:`Loan`).
        For large values built piece by piece, such as frames or arrays: a send copies
        a value into shared memory, a loan is that memory.

        Raises:
            TypeError, ValueError: ``size`` is not an int from 1 to 2**32 - 1.
            FeedTypeError: the feed's type is fixed and is not ``bytes``.
            FeedClosed: the feed was closed.
            OSError: (errno ENOSPC) /dev/shm cannot hold ``size`` bytes.
        """
        core = self._live()
        if core.words[L.FEED_CLOSED]:
            raise FeedClosed(f"shmfeed: loan on closed feed {core._label()}; a closed feed stays closed: use another")
        wanted = _codec.type_name(bytes)
        if core.type_name and core.type_name != wanted:
            raise FeedTypeError("Send", display_type(wanted), display_type(core.type_name))
        return Loan(self, core.namespace, size)

    def _send_lent(self, payload: _ring.Encoded, timeout: float | None) -> int:
        """Send a loan's value (``Loan.send``): a ``bytes`` value already in a pool file."""
        core, deadline = self._lent_core(timeout)
        return core.send(payload, deadline, timeout)

    async def _send_lent_async(self, payload: _ring.Encoded, timeout: float | None) -> int:
        """``_send_lent`` from asyncio (``Loan.send_async``), as :meth:`send_async` sends."""
        from . import _feed_async

        core, deadline = self._lent_core(timeout)
        return await _feed_async.send(core, payload, deadline, timeout)

    def _lent_core(self, timeout: float | None) -> tuple["FeedCore", float | None]:
        """The feed's core for a loan's send, its type checked as ``bytes``, and the deadline."""
        deadline = None
        if timeout is not None:
            _check_timeout(timeout)
            deadline = time.monotonic() + timeout
        core = self._live()
        self._fix_type(core, _codec.type_name(bytes), deadline, timeout)
        return core, deadline

    def send_many(self, values: Iterable[T], timeout: float | None = None) -> list[int]:
        """:meth:`send` of every value of ``values``, in order, paid as one call (a batch
        of small values costs less each). Every subscriber gets them in this order.

        Every value is checked and encoded before the first is sent: one of another type
        than the feed's (or than the others, on a feed whose type is not fixed yet), or
        one that cannot be encoded, raises and nobody gets any. ``timeout`` bounds the
        whole call.

        Returns:
            For each value, how many channels it was delivered to (as :meth:`send`).

        Raises:
            FeedTypeError, EncodingError: nothing was sent.
            FeedClosed: the feed was closed (``error.values_sent`` values were sent before).
            FeedSendTimeout: as :meth:`send`, for the value it was sending; the values
                before it were sent (``error.values_sent`` says how many), those after
                it were not.
        """
        deadline = None
        if timeout is not None:
            _check_timeout(timeout)
            deadline = time.monotonic() + timeout
        core = self._live()
        values = list(values)
        payloads = _codec.encode_many(values)
        type_names = {_codec.type_name(tp) for tp in set(map(type, values))}
        if len(type_names) > 1:
            names = sorted(type_names)
            raise FeedTypeError("Send", display_type(names[1]), display_type(names[0]))
        if type_names:
            self._fix_type(core, type_names.pop(), deadline, timeout)
        return core.send_many(payloads, deadline, timeout)  # one hold of the send lock, one wake-up each

    async def send_async(self, value: T, timeout: float | None = None) -> int:
        """Like :meth:`send`, for asyncio code: never blocks the event loop waiting.

        The same rules as :meth:`send`: sends are serialized feed-wide (every channel sees
        one order), no value is dropped for a slow subscriber (the send waits while its
        channel is full), and ``timeout`` bounds the whole send with ``FeedSendTimeout``.
        Waits (for the feed's send lock another send holds, for room in full channels)
        happen without blocking the loop; every write into a ring happens in the loop's
        thread between two awaits. The feed's send lock stays held across those awaits,
        so in the same event loop use ``send_async``, not ``send``, on this feed.

        Cancellation: cancelled before any channel took the value, nobody gets it.
        Cancelled once a channel took it, the send first completes (the remaining channels
        still get it, within ``timeout``), then ``CancelledError`` is raised: a value is
        never delivered to only some subscribers because its sender was cancelled.

        Returns:
            How many channels the value was delivered to, as :meth:`send`.

        Raises:
            FeedTypeError: ``type(value)`` is not the feed's type.
            EncodingError: the value cannot be encoded (a TypeError); nobody got it.
            FeedClosed: the feed was closed.
            FeedSendTimeout: (a ``TimeoutError``) the send could not finish within
                ``timeout`` seconds; ``delivered`` and ``pending`` say who got it.
        """
        from . import _feed_async  # here, not at the top: most users never need asyncio

        deadline = None
        if timeout is not None:
            _check_timeout(timeout)
            deadline = time.monotonic() + timeout
        core, payload = self._prepare(value, deadline, timeout)
        return await _feed_async.send(core, payload, deadline, timeout)

    def _prepare(self, value: Any, deadline: float | None, timeout: float | None) -> tuple["FeedCore", _ring.Encoded]:
        """The feed's core, and ``value`` encoded, its type checked (fixing the feed's)."""
        core = self._live()
        # Encoded first: a value that cannot travel must not fix the type.
        payload = core.encode(value)
        self._fix_type(core, _codec.type_name(type(value)), deadline, timeout)
        core.lane_type = type(value)  # the feed's type: the next send may take send's short path
        return core, payload

    def _live(self) -> "FeedCore":
        core = self._core
        return self._open() if core is None or core.released else core

    @staticmethod
    def _fix_type(core: "FeedCore", type_name: str, deadline: float | None, timeout: float | None) -> None:
        """Check ``type_name`` against the feed's type, fixing it if unset."""
        if type_name != core.type_name:
            try:
                core.check_send_type(type_name, deadline)
            except TimeoutError as error:
                raise core.nobody_reached(timeout, error) from error

    def _send_encoded(self, payload: bytes, type_name: str, skip_channel: int, timeout: float | None = None,
                      *, as_sender: bool = False, mark: _marks.Mark | None = None) -> int:
        """Send a value already encoded (by ``_codec``, elsewhere) whose type is named
        ``type_name``, to every subscription but those of channel ``skip_channel``: how a
        bridge injects what it got from NATS (see ``_bridge``). Raises as :meth:`send`.

        Unless ``as_sender``, this process does not become one of the feed's senders: the
        value's sender is the remote process, so a bridge killed with SIGKILL fails no
        subscription (SPEC §7); its own ordinary sends, if any, still register. With a
        ``mark`` it is a durable bridge's marked send (``_marks``): it answers
        ``_marks.ALREADY_APPLIED`` for a value delivered before."""
        deadline = None if timeout is None else time.monotonic() + timeout
        core = self._live()
        self._fix_type(core, type_name, deadline, timeout)
        return core.send(payload, deadline, timeout, skip_channel, as_sender, mark)

    def _send_marked_many(self, items: Sequence[tuple[bytes, str, _marks.Mark]], skip_channel: int,
                          ) -> list[int | ShmfeedError | OSError]:
        """A durable bridge's marked sends of values already encoded, in order, each with
        its type's name and mark (``FeedCore.send_marked_many``): per value, what
        ``_send_encoded(..., mark=...)`` without a timeout returns, or the error it raises
        (``FeedTypeError`` for a value of another type: the others are still sent)."""
        try:
            core = self._live()
        except (ShmfeedError, OSError) as error:
            return [error] * len(items)
        answers: list[int | ShmfeedError | OSError] = []
        sendable: list[tuple[_ring.Encoded, _marks.Mark]] = []
        places: list[int] = []
        for payload, type_name, mark in items:
            if type_name != core.type_name:
                try:
                    core.check_send_type(type_name, None)
                except (ShmfeedError, OSError) as error:
                    answers.append(error)
                    continue
            places.append(len(answers))
            answers.append(0)
            sendable.append((payload, mark))
        for place, answer in zip(places, core.send_marked_many(sendable, skip_channel)):
            answers[place] = answer
        return answers

    def close(self) -> None:
        """End every subscription successfully (their ``err()`` closes); later sends raise.

        This closes the feed for every process. To stop using it in this process only,
        use ``detach()`` (or the Feed as a context manager).
        """
        self._open().close()

    def detach(self) -> None:
        """This process is done with the feed; the feed goes on for every other process.

        Ends the subscriptions made through this Feed object (their ``err()`` closes)
        and makes the process no longer one of the feed's senders (until it sends again
        through another Feed object), so its exit, or even its death, fails nobody's
        subscription; once no other Feed object of this process uses the feed, lets go of
        its shared memory. Later calls on this object raise ``FeedClosed``.
        Idempotent. Exiting normally does the same for every feed of the process.
        """
        with self._open_lock:
            if self._detached:
                return
            self._detached = True
            core, self._core = self._core, None
        for subscription in list(self._subscriptions):
            if subscription._owner_pid == os.getpid():  # a forked child's copies are the parent's
                subscription.unsubscribe()
        if core is not None and not core.released:
            core.users -= 1
            if core.users <= 0:
                core.release()
            else:  # other Feed objects of this process keep it: still, we stopped sending
                core._stop_sending()

    def __enter__(self) -> "Feed[T]":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    @property
    def closed(self) -> bool:
        """True once any process closed the feed (False for a feed not created yet)."""
        core = self._existing()
        return core is not None and core.closed

    def statistics(self) -> FeedStatistics:
        """A snapshot of the feed's counters (see ``FeedStatistics``)."""
        core = self._existing()
        if core is None:  # not created yet: nothing happened on it
            return FeedStatistics(name=self._name, elem_type=None, sent=0, delivered=0, subscriptions=0, closed=False)
        core._refresh_type()
        words = core.words
        return FeedStatistics(
            name=self._name,
            elem_type=display_type(core.type_name) if core.type_name else None,
            sent=int(words[L.SENDS]),
            delivered=int(words[L.DELIVERED]),
            subscriptions=int(words[L.SUB_ACTIVE]),
            closed=bool(words[L.FEED_CLOSED]),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        self._open()
        return (_rebuild_feed, (self._namespace, self._key, self._name))

    def __repr__(self) -> str:
        label = repr(self._name) if self._name is not None else "anonymous"
        return f"<shmfeed.Feed {label}>"


Feed.__module__ = "shmfeed"


def _rebuild_feed(namespace: str, key: str, name: str | None) -> Feed[Any]:
    feed: Feed[Any] = Feed.__new__(Feed)
    feed._name = name
    feed._namespace = namespace
    feed._key = key
    feed._core = None
    feed._elem_type_name = ""
    feed._open_lock = threading.Lock()
    feed._detached = False
    feed._subscriptions = weakref.WeakSet()
    feed._open()
    return feed


_subscriptions: "weakref.WeakSet[FeedSubscription]" = weakref.WeakSet()


def release_namespace(namespace: str | None = None) -> None:
    """End this process's subscriptions and detach its feeds (of one namespace, or all)."""
    for subscription in list(_subscriptions):
        if namespace is None or subscription._feed.namespace == namespace:
            try:
                subscription.unsubscribe()
            except ShmfeedError:
                pass
    for core in list(_feeds.values()):
        if namespace is None or core.namespace == namespace:
            core.release()


def _at_exit() -> None:
    # Subscriptions end with their process (a killed process is handled by the registry).
    release_namespace(None)


def _after_fork() -> None:
    # The parent's subscriptions stay the parent's: the child must not end them at exit.
    _subscriptions.clear()
    if _ring._accel is not None:
        _ring._accel.forget_marks()
    for core in list(_feeds.values()):
        core.reattach_after_fork()


def _before_fork() -> None:
    for core in list(_feeds.values()):
        core.reserve_for_child()


def _subscribed_here(namespace: str, channel_id: int) -> bool:
    """Whether this process made an active subscription of the channel (no lock: a hint)."""
    me = _ring._pid
    for core in list(_feeds.values()):
        if core.namespace != namespace or core.released:
            continue
        if any(sub.channel_id == channel_id and sub.owner_pid == me
               for sub in L.active_subscriptions(core.words, core.table)):
            return True
    return False


_ring.subscribed_here = _subscribed_here


_process.on_exit(_at_exit)
_process.before_fork(_before_fork)
_process.on_fork_child(_after_fork)
