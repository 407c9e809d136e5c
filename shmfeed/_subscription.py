"""``Subscription``, error channels and ``select``.

A subscription's ``err()`` is an *error channel*: ``recv()`` returns the one error (an
exception instance) if the subscription failed, then ``None`` once it is closed, like Go's
``err, ok := <-sub.Err()``. Cross-process subscriptions keep it in a small shared-memory
channel so that any process (a feed closing, the registry) can fail or close it; in-process
ones use ``LocalErrorChannel``. Both, and ``Channel``, speak the select protocol:

- ``_select_poll(waker, deadline)``: ``(True, value)`` if ready (consumed), else
  ``(False, None)`` after registering ``waker`` (when given) in the same critical section;
  ``TimeoutError``, having consumed nothing, if a lock stayed held past ``deadline``;
- ``_select_forget(waker)``: stop notifying ``waker``.
"""

from __future__ import annotations

import abc
import random
import threading
import time
from typing import Any, Protocol

from . import _codec, _errors, _names, _waker
from ._channel import Channel, _check_timeout
from ._errors import ChannelClosed, ShmfeedError
from ._stats import SubscriptionStatistics


class _Selectable(Protocol):
    def _select_poll(self, waker: _waker.Waker | None, deadline: float | None = None) -> tuple[bool, Any]: ...

    def _select_forget(self, waker: _waker.Waker) -> None: ...


def _plain(value: object) -> bool:
    """Whether ``value`` is data that rebuilds no object of its own (safe to carry)."""
    if value is None or type(value) in (str, int, float, bool):
        return True
    return isinstance(value, (tuple, list)) and type(value) in (tuple, list) and all(map(_plain, value))


# Every exported error class by name: what an error channel may name. A name not in it
# (or not a library error) arrives as a plain ShmfeedError; nothing is ever imported.
_ERRORS_BY_NAME: dict[str, type[ShmfeedError]] = {
    name: cls
    for name in _errors.__all__
    if isinstance(cls := getattr(_errors, name), type) and issubclass(cls, ShmfeedError)
}


def encode_error(error: BaseException) -> bytes:
    """An exception as bytes for an error channel in another process.

    Its class travels by name, with its ``args`` and plain public attributes (such as
    ``FeedTypeError.got``), so the receiver rebuilds the same class: ``isinstance(e,
    TypeError)`` holds there for a ``FeedTypeError``. No pickle.
    """
    args = list(error.args) if _plain(error.args) else [str(error)]
    attrs = {key: value for key, value in vars(error).items() if not key.startswith("_") and _plain(value)}
    return _codec.encode({"error": type(error).__name__, "message": str(error), "args": args, "attrs": attrs})


def decode_error(data: object) -> BaseException:
    """The exception ``encode_error`` described, of the same class if it is an exported error."""
    if not isinstance(data, dict):
        return ShmfeedError(f"shmfeed: unreadable subscription error {data!r:.200}; the sending process "
                            f"runs another version of shmfeed, or the error channel was damaged")
    message = str(data.get("message", ""))
    cls = _ERRORS_BY_NAME.get(str(data.get("error")), ShmfeedError)
    args = data.get("args")
    attrs = data.get("attrs")
    if not isinstance(args, list) or not _plain(args):
        args = [message]
    try:
        # Built without calling __init__ (whose signature varies): args and attributes
        # are what the raising process had.
        error = cls.__new__(cls, *args)
        error.args = tuple(args)
        if isinstance(attrs, dict):
            for key, value in attrs.items():
                if isinstance(key, str) and not key.startswith("_") and _plain(value):
                    setattr(error, key, value)
    except Exception:  # noqa: BLE001 - whatever the bytes say, the receiver gets an error
        return ShmfeedError(message)
    return error


class ErrorChannel:
    """Where a subscription reports how it ended (see the module docstring)."""

    def recv(self, timeout: float | None = None) -> BaseException | None:
        """The subscription's error, or None once it is closed without (further) error.

        Raises:
            TimeoutError: the subscription is still running after ``timeout`` seconds.
        """
        raise NotImplementedError

    def _select_poll(self, waker: _waker.Waker | None, deadline: float | None = None) -> tuple[bool, Any]:
        raise NotImplementedError

    def _select_forget(self, waker: _waker.Waker) -> None:
        raise NotImplementedError


class SharedErrorChannel(ErrorChannel):
    """An error channel in shared memory: failed or closed from any process."""

    def __init__(self, channel: Channel[Any]) -> None:
        self.channel = channel

    def recv(self, timeout: float | None = None) -> BaseException | None:
        _check_timeout(timeout)
        try:
            return decode_error(self.channel.recv(timeout))
        except ChannelClosed:
            return None

    def _select_poll(self, waker: _waker.Waker | None, deadline: float | None = None) -> tuple[bool, Any]:
        try:
            ready, value = self.channel._select_poll(waker, deadline)
        except ChannelClosed:
            return True, None
        return (True, decode_error(value)) if ready else (False, None)

    def _select_forget(self, waker: _waker.Waker) -> None:
        self.channel._select_forget(waker)

    @property
    def _select_namespace(self) -> str:
        return self.channel._select_namespace

    def __repr__(self) -> str:
        return f"<shmfeed.ErrorChannel {'closed' if self.channel.closed else 'open'}>"


class LocalErrorChannel(ErrorChannel):
    """An error channel inside one process (for subscriptions that live in one process)."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._error: BaseException | None = None
        self._closed = False
        self._wakers: list[_waker.Waker] = []

    def fail(self, error: BaseException) -> None:
        """Deliver ``error`` once, then close."""
        with self._condition:
            if self._closed:
                return
            self._error = error
            self._closed = True
            self._notify_locked()

    def close(self) -> None:
        with self._condition:
            if self._closed:
                return
            self._closed = True
            self._notify_locked()

    @property
    def closed(self) -> bool:
        return self._closed

    def _notify_locked(self) -> None:
        self._condition.notify_all()
        wakers, self._wakers = self._wakers, []
        for waker in wakers:
            waker.post()

    def _take_locked(self) -> tuple[bool, BaseException | None]:
        if not self._closed:
            return False, None
        error, self._error = self._error, None
        return True, error

    def recv(self, timeout: float | None = None) -> BaseException | None:
        _check_timeout(timeout)
        with self._condition:
            if not self._condition.wait_for(lambda: self._closed, timeout):
                raise TimeoutError("shmfeed: the subscription is still running; wait longer (timeout=None waits for ever)")
            return self._take_locked()[1]

    def _select_poll(self, waker: _waker.Waker | None, deadline: float | None = None) -> tuple[bool, Any]:
        with self._condition:  # an in-process lock, held for a few steps: no deadline needed
            ready, error = self._take_locked()
            if not ready and waker is not None and waker not in self._wakers:
                self._wakers.append(waker)
            return ready, error

    def _select_forget(self, waker: _waker.Waker) -> None:
        with self._condition:
            if waker in self._wakers:
                self._wakers.remove(waker)

    def __repr__(self) -> str:
        return f"<shmfeed.ErrorChannel in-process {'closed' if self._closed else 'open'}>"


ErrorChannel.__module__ = "shmfeed"  # exported; its implementations are not


class Subscription(abc.ABC):
    """A stream of events being delivered somewhere, which can be cancelled.

    Users may implement it (``err`` and ``unsubscribe``). Used as a context manager it
    unsubscribes on exit.
    """

    @abc.abstractmethod
    def err(self) -> ErrorChannel:
        """The error channel: one error if the subscription failed, None once closed."""

    @abc.abstractmethod
    def unsubscribe(self) -> None:
        """Stop delivery and close the error channel. Safe to call again, from any thread."""

    def statistics(self) -> SubscriptionStatistics:
        """Whether the subscription is active, and its channel's counters if it has one."""
        active = not getattr(self.err(), "closed", False)
        return SubscriptionStatistics(active=active, channel=None)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unsubscribe()


Subscription.__module__ = "shmfeed"


def select(*channels: Any, timeout: float | None = None) -> tuple[Any, Any]:
    """Wait until one of the channels can be received from, and receive from it.

    Data channels and error channels (``sub.err()``) may be mixed. Returns
    ``(channel, value)``; a closed error channel yields ``(err_channel, None)``. When
    several are ready one is picked at random. The waiting thread sleeps on a semaphore
    and uses no CPU.

    ``timeout`` bounds the whole call, including waits for a channel's receive lock while
    another process holds it.

    Raises:
        TimeoutError: nothing was ready (or a receive lock stayed held by another process)
            within ``timeout`` seconds (``0`` polls); nothing was taken.
        ChannelClosed: a data channel is closed and drained.
        TypeError: an argument is not a channel.
    """
    if not channels:
        raise TypeError("shmfeed: select needs at least one channel; pass channels or error channels")
    for channel in channels:
        poll = getattr(type(channel), "_select_poll", None)
        if poll is None or poll is ErrorChannel._select_poll:
            raise TypeError(f"shmfeed: select takes shmfeed channels and error channels, got {type(channel).__name__}; "
                            f"pass Channels or sub.err()")
    _check_timeout(timeout)
    namespaces = {ns for ns in (getattr(c, "_select_namespace", None) for c in channels) if ns}
    if len(namespaces) > 1:
        raise ValueError("shmfeed: select over channels of different namespaces; select within one namespace")
    namespace = namespaces.pop() if namespaces else _names.current_namespace()
    start = random.randrange(len(channels))
    order = channels[start:] + channels[:start]
    deadline = None if timeout is None else time.monotonic() + timeout
    for channel in order:
        ready, value = channel._select_poll(None, deadline)
        if ready:
            return channel, value
    if timeout is not None and timeout <= 0:
        raise TimeoutError("shmfeed: no channel was ready; poll again later, or give a timeout to wait")
    waker = _waker.current_waker(namespace)
    try:
        while True:
            for channel in order:
                ready, value = channel._select_poll(waker, deadline)
                if ready:
                    return channel, value
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"shmfeed: no channel was ready within {timeout} s; wait longer (timeout=None waits for ever)")
            waker.wait(remaining)
    finally:
        for channel in order:
            channel._select_forget(waker)
        waker.drain()
