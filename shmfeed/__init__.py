"""shmfeed: go-ethereum's event model (Feed, Subscription, select, ...) across processes.

A ``Feed`` in one process fans each value out to ``Channel``s living in many processes;
each Channel is one ring buffer in POSIX shared memory guarded by POSIX semaphores, and
values travel as msgpack. See ``docs/architecture.md`` for the map of the package.
"""

from ._channel import Channel
from ._codec import register_type
from ._errors import (
    ChannelClosed,
    ChannelCorruptError,
    EncodingError,
    ErrMuxClosed,
    FeedClosed,
    FeedTypeError,
    MuxClosedError,
    RegistryUnavailableError,
    SenderDiedError,
    ShmfeedError,
    SlowSubscriberError,
    SubscriptionFailed,
)
from ._feed import Feed
from ._resubscribe import join_subscriptions, new_subscription, resubscribe, resubscribe_err
from ._scope import SubscriptionScope
from ._stats import ChannelStatistics, FeedStatistics, SubscriptionStatistics
from ._subscription import ErrorChannel, Subscription, select
from ._typemux import TypeMux, TypeMuxEvent, TypeMuxSubscription

__all__ = [
    "Channel",
    "ChannelClosed",
    "ChannelCorruptError",
    "ChannelStatistics",
    "EncodingError",
    "ErrMuxClosed",
    "ErrorChannel",
    "Feed",
    "FeedClosed",
    "FeedStatistics",
    "FeedTypeError",
    "MuxClosedError",
    "RegistryUnavailableError",
    "SenderDiedError",
    "ShmfeedError",
    "SlowSubscriberError",
    "Subscription",
    "SubscriptionFailed",
    "SubscriptionScope",
    "SubscriptionStatistics",
    "TypeMux",
    "TypeMuxEvent",
    "TypeMuxSubscription",
    "join_subscriptions",
    "new_subscription",
    "register_type",
    "resubscribe",
    "resubscribe_err",
    "select",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or callable(_obj):
        try:
            _obj.__module__ = "shmfeed"
        except (AttributeError, TypeError):
            pass
del _name, _obj

__version__ = "0.1.0"
