"""``TypeMux``: go-ethereum's (deprecated) event multiplexer, built on Feeds.

A mux keeps one Feed per event type. ``subscribe(*types)`` makes one Channel and subscribes
it to the feed of each type; ``post(ev)`` sends ``TypeMuxEvent(now, ev)`` on the feed of
``type(ev)``. ``TypeMux("x")`` uses named feeds (``typemux:x:<module.qualname>``), so every
process of the namespace that opens ``"x"`` posts to and subscribes on the same mux, plus a
named *state* feed on which nothing is sent: ``stop()`` closes it. ``TypeMux()`` is the same
under a hidden random name, so that a mux made before a fork is one mux in the parent and
its children (its feeds are created at first use). Later posts in any process see it closed and raise
``MuxClosedError``; each process with subscriptions on the mux runs one watcher thread,
subscribed to the state feed, that wakes when it closes and stops the mux there too
(closing that process's subscription channels, which releases posts waiting on them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import weakref
from datetime import datetime, timezone
from typing import Any

from . import _codec, _names, _process
from . import _layout as L
from ._channel import Channel
from ._errors import FeedClosed, MuxClosedError
from ._feed import Feed
from ._resubscribe import QuitEvent, new_subscription
from ._subscription import Subscription, select

__all__ = ["TypeMux", "TypeMuxEvent", "TypeMuxSubscription"]

_NAME_MAX = 200  # leaves room in a feed name (at most L.FEED_NAME_MAX) for the type
_STATE_RING_BYTES = 4096  # the watcher's channel never receives a value


@dataclasses.dataclass(frozen=True)
class TypeMuxEvent:
    """A time-tagged event delivered by a ``TypeMux`` (geth's ``TypeMuxEvent``).

    Attributes:
        time: when it was posted (timezone-aware, UTC).
        data: the posted value.
    """

    time: datetime
    data: Any


TypeMuxEvent.__module__ = "shmfeed"  # the codec names it shmfeed.TypeMuxEvent in every process


class ClosedFlag:
    """A truth value that is read as a property and may also be called (see
    ``TypeMuxSubscription.closed``); compares equal to the bool it stands for."""

    __slots__ = ("_value",)

    def __init__(self, value: bool) -> None:
        self._value = value

    def __bool__(self) -> bool:
        return self._value

    def __call__(self) -> bool:
        return self._value

    def __eq__(self, other: object) -> bool:
        return self._value == (bool(other) if isinstance(other, ClosedFlag) else other)

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return repr(self._value)


_CLOSED, _OPEN = ClosedFlag(True), ClosedFlag(False)


class TypeMuxSubscription:
    """A subscription to some event types of a ``TypeMux``.

    ``chan()`` is the Channel that receives a ``TypeMuxEvent`` for each event posted of
    those types. It is closed by ``unsubscribe()`` and by ``TypeMux.stop()``; events already
    in it can still be received. A context manager that unsubscribes on exit.
    """

    def __init__(self, mux: "TypeMux", types: tuple[type, ...], capacity: int) -> None:
        self._mux = mux
        self._types = types
        self._channel: Channel[TypeMuxEvent] = Channel(TypeMuxEvent, capacity)
        self._lock = threading.Lock()
        self._closed = False
        self._feed_subs: list[Subscription] = []

    def chan(self) -> Channel[TypeMuxEvent]:
        """The channel of ``TypeMuxEvent``s (always the same one)."""
        return self._channel

    @property
    def closed(self) -> "ClosedFlag":
        """Whether the subscription ended (unsubscribed, or its mux stopped).

        A property, as ``closed`` is everywhere in shmfeed (``Channel``, ``Feed``): ``if
        sub.closed``. Calling it, ``sub.closed()``, gives the same bool, as geth's
        ``Closed()`` and SPEC §2 spell it.
        """
        return _CLOSED if self._closed else _OPEN

    def unsubscribe(self) -> None:
        """Stop delivery and close the channel; releases a ``post`` waiting on it.

        Idempotent; may be called from any thread.
        """
        self._mux._forget(self)
        self._close()

    def _attach(self, feeds: list[Feed[TypeMuxEvent]]) -> bool:
        """Subscribe the channel to each feed; False if the subscription was closed first."""
        with self._lock:  # _close waits, so it ends every feed subscription made here
            if self._closed:
                return False
            for feed in feeds:
                self._feed_subs.append(feed.subscribe(self._channel))
            return True

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subs, self._feed_subs = self._feed_subs, []
        for sub in subs:
            sub.unsubscribe()  # releases posts waiting for room in the channel
        self._channel.close()

    def __enter__(self) -> "TypeMuxSubscription":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unsubscribe()

    def __repr__(self) -> str:
        names = ", ".join(t.__qualname__ for t in self._types)
        return f"<shmfeed.TypeMuxSubscription [{names}] {'closed' if self._closed else 'active'}>"


class TypeMux:
    """Dispatches events to subscribers by the events' type (geth's deprecated TypeMux).

    Prefer ``Feed`` in new code; TypeMux is kept for parity with go-ethereum. ``TypeMux()``
    lives in this process. ``TypeMux("name")`` is shared by every process of the namespace
    that opens that name: an event posted in one is delivered to subscriptions in all, and
    ``stop()`` in one stops it in all. A stopped named mux stays stopped while any process
    still uses it (its shared memory is gone once none does; the name is then fresh).

    Posts of one type are serialized (they go through one Feed): every subscription sees
    them in one order. Event values travel as ``Feed`` values do (see Encoding).
    """

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            _names.validate_name(name, what="TypeMux name", limit=_NAME_MAX)
        self._name = name
        # An anonymous mux is a named one under a name nobody else knows (see the module).
        self._shared_name = name if name is not None else f"anonymous.{_names.new_id():016x}"
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when no post is running
        self._posting = 0
        self._stopped = False
        self._feeds: dict[type, Feed[TypeMuxEvent]] = {}
        self._subs: set[TypeMuxSubscription] = set()
        self._state: Feed[Any] | None = Feed(f"typemux-state:{name}") if name is not None else None  # lazy if None
        self._watcher: Subscription | None = None
        _muxes.add(self)

    @property
    def name(self) -> str | None:
        return self._name

    def subscribe(self, *types: type, capacity: int = 1) -> TypeMuxSubscription:
        """Subscribe to the events of the given types posted from now on.

        Events posted before this call are not delivered. After ``stop()`` the returned
        subscription's channel is already closed.

        Args:
            types: the event types (classes); ``type(ev)`` must be one of them exactly.
            capacity: events the channel holds before ``post`` waits for the subscriber.
                The default, 1, is the closest to geth's unbuffered channel.

        Returns:
            The subscription; read events from ``sub.chan()``.

        Raises:
            TypeError: an argument is not a type.
            ValueError: a type is given twice
                (``event: duplicate type <T> in Subscribe``), or ``capacity`` < 1.
        """
        seen: set[type] = set()
        for tp in types:
            if not isinstance(tp, type):
                raise TypeError(f"shmfeed: TypeMux.subscribe takes types, got {tp!r}; pass classes such as Ping")
            if tp in seen:
                raise ValueError(f"event: duplicate type {tp.__qualname__} in Subscribe")
            seen.add(tp)
        sub = TypeMuxSubscription(self, tuple(types), capacity)
        with self._lock:
            live = not self._stopped
            if live:
                self._subs.add(sub)
        try:
            if live and not self._stopped_elsewhere():
                if sub._attach([self._feed_for(tp) for tp in types]):
                    self._ensure_watcher()
                    return sub
        except FeedClosed:
            pass  # stopped meanwhile (a stopped mux's feeds are closed)
        except BaseException:
            sub.unsubscribe()
            raise
        sub.unsubscribe()
        if live and self._stopped_elsewhere():
            self.stop()  # as a post would: this mux learns it was stopped
        return sub

    def post(self, ev: object) -> None:
        """Deliver ``TypeMuxEvent(now, ev)`` to every subscription for ``type(ev)``.

        Waits while a subscriber's channel is full (``capacity``); unsubscribing it, or
        ``stop()``, releases the wait.

        Raises:
            MuxClosedError: the mux was stopped (in any process, for a named mux).
            EncodingError: ``ev`` cannot be encoded (nobody received it).
        """
        event = TypeMuxEvent(datetime.now(timezone.utc), ev)
        with self._lock:
            if self._stopped:
                raise MuxClosedError()
            self._posting += 1
        stopped_elsewhere = False
        try:
            if self._stopped_elsewhere():
                stopped_elsewhere = True
                raise MuxClosedError()
            try:
                self._feed_for(type(ev)).send(event)  # subscribers may be in other processes
            except FeedClosed:
                raise MuxClosedError() from None
        finally:
            with self._lock:
                self._posting -= 1
                if not self._posting:
                    self._idle.notify_all()
            if stopped_elsewhere:
                self.stop()

    def stop(self) -> None:
        """Stop the mux: close every subscription's channel; later posts raise.

        Blocks until the posts running in this process have finished (closing the
        channels releases those that wait). For a named mux, every process using it stops
        too: their posts raise ``MuxClosedError`` and their subscriptions' channels close.
        Idempotent.
        """
        with self._lock:
            first = not self._stopped
            self._stopped = True
            subs, self._subs = list(self._subs), set()
            watcher, self._watcher = self._watcher, None
            feeds = list(self._feeds.values())
        if first:
            self._state_feed().close()  # tells the other processes (see the module docstring)
        for sub in subs:
            sub._close()
        if first:
            for feed in feeds:
                feed.close()  # ends this mux's subscriptions in every process at once
        if watcher is not None:
            watcher.unsubscribe()
        with self._lock:
            self._idle.wait_for(lambda: self._posting == 0)

    def _state_feed(self) -> Feed[Any]:
        """The state feed (see the module docstring), opened at first need."""
        state = self._state
        if state is None:
            with self._lock:
                state = self._state
                if state is None:
                    state = self._state = Feed(f"typemux-state:{self._shared_name}")
        return state

    def _stopped_elsewhere(self) -> bool:
        """Whether another process (or another TypeMux object) stopped this mux."""
        return self._state_feed().closed

    def _feed_for(self, tp: type) -> Feed[TypeMuxEvent]:
        """The feed of events of type ``tp`` (opened or created on first use)."""
        feed = self._feeds.get(tp)
        if feed is None:
            with self._lock:
                feed = self._feeds.get(tp)
                if feed is None:
                    feed = self._feeds[tp] = Feed(self._feed_name(tp))
        return feed

    def _feed_name(self, tp: type) -> str:
        type_name = _codec.type_name(tp)
        name = f"typemux:{self._shared_name}:{type_name}"
        if len(name) > L.FEED_NAME_MAX:
            name = f"typemux:{self._shared_name}:#{hashlib.sha1(type_name.encode()).hexdigest()[:24]}"
        return name

    def _forget(self, sub: TypeMuxSubscription) -> None:
        with self._lock:
            self._subs.discard(sub)
            watcher = None
            if not self._subs and self._watcher is not None:
                watcher, self._watcher = self._watcher, None  # nothing left to stop here
        if watcher is not None:
            watcher.unsubscribe()

    def _ensure_watcher(self) -> None:
        with self._lock:
            if self._watcher is None and not self._stopped and self._subs:
                self._watcher = new_subscription(self._watch)

    def _watch(self, quit: QuitEvent) -> None:
        """The watcher thread: wait until the state feed closes, then stop here too."""
        _watching.add(threading.current_thread())
        try:
            self._watch_state(quit)
        finally:
            _watching.discard(threading.current_thread())

    def _watch_state(self, quit: QuitEvent) -> None:
        state = self._state_feed()
        channel: Channel[Any] = Channel(capacity=1, buffer_size=_STATE_RING_BYTES)
        try:
            while True:
                try:
                    sub = state.subscribe(channel)
                except FeedClosed:
                    break
                try:
                    which, _ = select(sub.err(), quit.channel)
                finally:
                    sub.unsubscribe()
                core = state._core
                if which is quit.channel or core is None or core.released:
                    return  # unsubscribed, or this process is letting go of the namespace
                if state.closed:
                    break
                if quit.wait(1.0):  # the watch failed otherwise (registry trouble): retry calmly
                    return
        finally:
            channel.close()
        self.stop()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_mux, (self._name, self._shared_name))

    def __repr__(self) -> str:
        label = repr(self._name) if self._name is not None else "anonymous"
        return f"<shmfeed.TypeMux {label}{' stopped' if self._stopped else ''}>"


TypeMux.__module__ = TypeMuxSubscription.__module__ = "shmfeed"


def _rebuild_mux(name: str | None, shared_name: str) -> TypeMux:
    mux = TypeMux(name)
    mux._shared_name = shared_name
    return mux

_muxes: "weakref.WeakSet[TypeMux]" = weakref.WeakSet()


_watching: set[threading.Thread] = set()  # watcher threads still running (see _stop_watchers)
_WATCHER_EXIT_WAIT = 5.0  # seconds the exit waits for watchers already finishing on their own


def _stop_watchers() -> None:
    # Before the feeds are released at exit (hooks run last-registered first): a watcher
    # must not see its subscription end and open the state feed again. One that is ending
    # by itself (the state feed closed: it stops its mux, which no longer lists it) is
    # waited for too, or its channel is still attached when the process is gone and stays
    # in /dev/shm until the registry notices.
    for mux in list(_muxes):
        with mux._lock:
            watcher, mux._watcher = mux._watcher, None
        if watcher is not None:
            watcher.unsubscribe()
    for thread in list(_watching):
        if thread is not threading.current_thread():
            thread.join(_WATCHER_EXIT_WAIT)


def _after_fork() -> None:
    # The parent's threads do not exist here, and its locks may have been held.
    _watching.clear()
    for mux in list(_muxes):
        mux._lock = threading.Lock()
        mux._idle = threading.Condition(mux._lock)
        mux._posting = 0
        mux._watcher = None


_process.on_exit(_stop_watchers)
_process.on_fork_child(_after_fork)
