"""The error tree of shmfeed: one root, precise leaves, built-in bases where they fit."""

from __future__ import annotations

__all__ = [
    "ShmfeedError",
    "FeedTypeError",
    "EncodingError",
    "ChannelClosed",
    "FeedClosed",
    "MuxClosedError",
    "ErrMuxClosed",
    "SlowSubscriberError",
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
