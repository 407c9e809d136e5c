"""The error tree of shmfeed: one root, precise leaves, built-in bases where they fit."""

from __future__ import annotations

__all__ = [
    "ShmfeedError",
    "FeedTypeError",
    "EncodingError",
    "UnknownTypeError",
    "ChannelClosed",
    "FeedClosed",
    "MuxClosedError",
    "ErrMuxClosed",
    "SlowSubscriberError",
    "FeedSendTimeout",
    "SubscriptionFailed",
    "SenderDiedError",
    "RegistryUnavailableError",
    "ChannelCorruptError",
    "TableFullError",
]


class ShmfeedError(Exception):
    """Root of every error raised by shmfeed itself."""


class FeedTypeError(ShmfeedError, TypeError):
    """A value or channel of the wrong element type was given to a Feed or typed Channel.

    The message has go-ethereum's shape: ``event: wrong type in Send got <got>, want <want>``.
    """

    def __init__(self, op: str, got: str, want: str) -> None:
        super().__init__(f"event: wrong type in {op} got {got}, want {want}")
        self.op = op
        self.got = got
        self.want = want

    def __reduce__(self) -> tuple[object, ...]:
        # Raised in a Pool worker, it is pickled back to the parent: rebuild from the parts.
        return (type(self), (self.op, self.got, self.want))


class EncodingError(ShmfeedError, TypeError):
    """A value cannot be encoded for another process (nothing was delivered)."""


class UnknownTypeError(ShmfeedError):
    """A received value is of a type this process has neither imported nor registered.

    Decoding never imports a module, so the receiver must know its event types itself.
    The channel is not corrupt and stays usable: this one value was taken from it and is
    dropped (the sender's send succeeded); the next ``recv`` gets the next value. Not a
    ``ChannelCorruptError`` (nor a ``SubscriptionFailed``): the subscription goes on.

    Attributes:
        type_name: the type's name as the sender gave it (``module.qualname``, or the name
            given to ``register_type``).
    """

    def __init__(self, type_name: str, what: str = "class", problem: str = "", fix: str = "") -> None:
        problem = problem or f"no {what} {type_name!r} in this process"
        if not fix and what == "registered type":
            fix = "call shmfeed.register_type for it (same name) before receiving"
        fix = fix or "import its module (or call shmfeed.register_type for it) before receiving"
        super().__init__(
            f"shmfeed: a received value could not be decoded: {problem}, so it was dropped (the "
            f"channel goes on); {fix}: decoding never imports a module"
        )
        self.type_name = type_name

    def __reduce__(self) -> tuple[object, ...]:
        # Pickled (a Pool task raising it): keep the message, whatever built it.
        return (_rebuild_unknown_type_error, (str(self), self.type_name))


def _rebuild_unknown_type_error(message: str, type_name: str) -> UnknownTypeError:
    error = UnknownTypeError.__new__(UnknownTypeError, message)
    ShmfeedError.__init__(error, message)
    error.type_name = type_name
    return error


class ChannelClosed(ShmfeedError):
    """The channel was closed (by any process) and, for receivers, has been drained."""


class FeedClosed(ShmfeedError):
    """The feed was closed; it takes no more sends or subscriptions."""


class MuxClosedError(ShmfeedError):
    """The TypeMux was stopped (go-ethereum's ``ErrMuxClosed``)."""

    def __init__(self, message: str = "event: mux closed") -> None:
        super().__init__(message)


ErrMuxClosed = MuxClosedError


class SlowSubscriberError(ShmfeedError):
    """The subscription was ended because its channel was full (overflow="evict")."""


class FeedSendTimeout(ShmfeedError, TimeoutError):
    """``Feed.send(value, timeout=...)`` could not deliver to every channel in time.

    The channels that got the value keep it; the others never get it from this send (their
    copies were withdrawn), so sending the value again reaches the first ones twice.

    Attributes:
        delivered: how many channels got the value (what ``send`` would have returned).
        pending: labels of the channels that did not get it: each channel's hex id, as its
            ``repr`` shows it. The message says why for each: ``full``, ``locked`` (a lock
            of it held by another process) or ``not reached`` (time ran out before it).
            Every other subscribed channel got the value, but for those a send skips
            anyway (closed, unsubscribed meanwhile, or dropping it by overflow policy).
    """

    def __init__(self, message: str, *, delivered: int = 0, pending: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.delivered = delivered
        self.pending = pending

    @classmethod
    def of_send(
        cls, feed: str, timeout: float | None, delivered: int, pending: list[tuple[str, str]], cause: str = ""
    ) -> "FeedSendTimeout":
        """The error of one send of ``feed``: ``pending`` holds (label, why) pairs."""
        channels = "channel" if delivered == 1 else "channels"
        message = f"shmfeed: feed {feed} send timed out after {timeout} s: delivered to {delivered} {channels}"
        if pending:
            message += ", not to " + ", ".join(f"{label} ({why})" for label, why in pending)
        if cause:
            message += f"; {cause}"
        if pending:
            message += "; send it again to reach those (the others get it twice), or give a longer timeout"
        return cls(message, delivered=delivered, pending=tuple(label for label, _ in pending))

    def __reduce__(self) -> tuple[object, ...]:
        # Exceptions pickle as type(self)(*args): keep the attributes too.
        return (_rebuild_feed_send_timeout, (str(self), self.delivered, self.pending))


def _rebuild_feed_send_timeout(message: str, delivered: int, pending: tuple[str, ...]) -> FeedSendTimeout:
    return FeedSendTimeout(message, delivered=delivered, pending=pending)


class SubscriptionFailed(ShmfeedError):
    """Base of the failures a cross-process subscription reports on ``err()``."""


class SenderDiedError(SubscriptionFailed):
    """The feed's last sending process died without closing the feed."""


class RegistryUnavailableError(SubscriptionFailed):
    """The namespace's registry went away and could not be reached again."""


class ChannelCorruptError(SubscriptionFailed):
    """The bytes in a channel's ring are not a valid message (a buggy or hostile writer)."""


class TableFullError(ShmfeedError):
    """A fixed-size table in shared memory is full; the message names the limit.

    Nothing was changed: the call that would have overflowed the table refuses instead.
    """
