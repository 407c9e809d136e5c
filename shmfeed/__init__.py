"""shmfeed: go-ethereum's event model (Feed, Subscription, select, ...) across processes.

A ``Feed`` in one process fans each value out to ``Channel``s living in many processes;
each Channel is one ring buffer in POSIX shared memory guarded by POSIX semaphores, and
values travel as msgpack. See ``docs/architecture.md`` for the map of the package.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from ._errors import (
    ChannelClosed,
    ChannelCorruptError,
    ChannelEmpty,
    ChannelFull,
    EncodingError,
    ErrMuxClosed,
    FeedClosed,
    FeedSendTimeout,
    FeedTypeError,
    MuxClosedError,
    RegistryUnavailableError,
    SenderDiedError,
    ShmfeedError,
    SlowSubscriberError,
    SubscriptionFailed,
    TableFullError,
    UnknownTypeError,
)

if _typing.TYPE_CHECKING:
    from ._bridge import Bridge, BridgeFeedStatistics, BridgeStatistics
    from ._channel import Channel
    from ._codec import register_type
    from ._feed import Feed
    from ._loan import Loan
    from ._resubscribe import join_subscriptions, new_subscription, resubscribe, resubscribe_err
    from ._scope import SubscriptionScope
    from ._stats import ChannelStatistics, FeedStatistics, SubscriptionStatistics
    from ._subscription import ErrorChannel, Subscription, select, select_async
    from ._names import set_namespace
    from ._typemux import TypeMux, TypeMuxEvent, TypeMuxSubscription

__all__ = [
    "Bridge",
    "BridgeFeedStatistics",
    "BridgeStatistics",
    "Channel",
    "ChannelClosed",
    "ChannelCorruptError",
    "ChannelEmpty",
    "ChannelFull",
    "ChannelStatistics",
    "EncodingError",
    "ErrMuxClosed",
    "ErrorChannel",
    "Feed",
    "FeedClosed",
    "FeedSendTimeout",
    "FeedStatistics",
    "FeedTypeError",
    "Loan",
    "MuxClosedError",
    "RegistryUnavailableError",
    "SenderDiedError",
    "ShmfeedError",
    "SlowSubscriberError",
    "Subscription",
    "SubscriptionFailed",
    "SubscriptionScope",
    "SubscriptionStatistics",
    "TableFullError",
    "TypeMux",
    "TypeMuxEvent",
    "TypeMuxSubscription",
    "UnknownTypeError",
    "join_subscriptions",
    "new_subscription",
    "register_type",
    "resubscribe",
    "resubscribe_err",
    "select",
    "set_namespace",
    "select_async",
]

# The rest loads on first use, so that `import shmfeed` (and the registry process, which
# needs only the control plane) starts fast; the errors load now because the library
# raises them from anywhere.
_LAZY = {
    "Bridge": "_bridge",  # imports nats-py only when a bridge starts
    "BridgeFeedStatistics": "_bridge",
    "BridgeStatistics": "_bridge",
    "Channel": "_channel",
    "register_type": "_codec",
    "Feed": "_feed",
    "Loan": "_loan",
    "join_subscriptions": "_resubscribe",
    "new_subscription": "_resubscribe",
    "resubscribe": "_resubscribe",
    "resubscribe_err": "_resubscribe",
    "SubscriptionScope": "_scope",
    "ChannelStatistics": "_stats",
    "FeedStatistics": "_stats",
    "SubscriptionStatistics": "_stats",
    "ErrorChannel": "_subscription",
    "Subscription": "_subscription",
    "select": "_subscription",
    "set_namespace": "_names",
    "select_async": "_subscription",
    "TypeMux": "_typemux",
    "TypeMuxEvent": "_typemux",
    "TypeMuxSubscription": "_typemux",
}


def _present_as_public(value: _typing.Any) -> None:
    """Show public names as ``shmfeed.X`` in reprs and tracebacks."""
    try:
        value.__module__ = "shmfeed"
    except (AttributeError, TypeError):
        pass


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shmfeed' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    _present_as_public(value)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


for _name in __all__:
    if _name not in _LAZY:
        _present_as_public(globals()[_name])
del _name

__version__ = "0.1.0"
