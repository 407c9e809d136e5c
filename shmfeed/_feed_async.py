"""``Feed.send_async``: a feed's send from asyncio, never blocking the event loop on room.

It keeps ``Feed.send``'s rules: the feed's send lock is held for the whole send (so every
channel sees one order), every channel with room is written first, the full ones are
waited on until each took the value or its subscription ended, and a deadline withdraws
what is left with ``FeedSendTimeout``. Only the waits differ: a busy send lock is waited
for by a thread of its own (``_aio.acquire``), full channels through the process's async
waker (``_aio``), and every ring write happens in the event loop's thread between two
awaits.

Cancellation: cancelled before any channel took the value (waiting for the send lock,
or every subscribed channel full), the send is withdrawn and nobody gets it. Cancelled
once some channel took it, the send is completed first (shielded: the remaining channels
still get it, with the same deadline), then ``CancelledError`` is raised. Either way no
channel gets the value twice, and none of the others gets it later.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Hashable

from . import _aio, _ring, _shm
from . import _layout as L
from ._errors import FeedSendTimeout

if TYPE_CHECKING:
    from ._feed_core import FeedCore, _Waiting


async def send(core: "FeedCore", payload: _ring.Encoded, deadline: float | None, timeout: float | None) -> int:
    """Deliver one encoded value to every subscribed channel; returns how many took it.

    Raises:
        FeedSendTimeout: the send could not finish by ``deadline``.
        asyncio.CancelledError: cancelled (see the module docstring for what was sent).
    """
    words = core.words
    try:
        if not core._is_sender:
            core._register_sender()
        if not await _aio.acquire(core.send_lock, deadline):
            raise _shm.lock_timeout(f"the send lock of feed {core._label()}", int(words[L.SEND_LOCK_OWNER]))
    except TimeoutError as error:
        raise core.nobody_reached(timeout, error) from error
    words[L.SEND_LOCK_OWNER] = _ring._pid
    try:
        try:
            delivered, waiting, spill = core.first_pass(payload, None, -1, deadline, timeout)
        except FeedSendTimeout:
            raise
        except TimeoutError as error:  # the table's lock, before any ring: nobody got it
            raise core.nobody_reached(timeout, error) from error
        try:
            if waiting:
                return await _wait_for_room(core, delivered, waiting, deadline, timeout)
            core._count(delivered)
            return delivered
        finally:
            if spill is not None:
                spill.close()
    finally:
        words[L.SEND_LOCK_OWNER] = 0
        core.send_lock.release()


async def _wait_for_room(
    core: "FeedCore", delivered: int, waiting: "list[_Waiting]", deadline: float | None, timeout: float | None
) -> int:
    """Offer the value to the full channels again each time one of them may have room,
    until each took it or its subscription ended (feed send lock held). Returns how many
    channels got the value in all."""
    from ._channel import send_wait_list

    registered: dict[Hashable, _ring.ChannelCore] = {send_wait_list(entry.target.core): entry.target.core for entry in waiting}
    dispatcher = _aio.dispatcher(core.namespace)
    dispatcher.enter(registered)
    cancelled: asyncio.CancelledError | None = None
    try:
        while True:
            future = dispatcher.future()  # before the offers register the waker
            try:
                got, locked = core.offer_waiting(waiting, dispatcher.waker, deadline)
                delivered += got
                if not waiting:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if locked is not None or (remaining is not None and remaining <= 0):
                    pending = [(entry.target, "locked" if entry.target is locked else "full") for entry in waiting]
                    expired = core._expire(timeout, delivered, waiting, pending)
                    if cancelled is not None:
                        raise cancelled from expired
                    raise expired
                try:
                    await asyncio.wait_for(future, remaining)
                except asyncio.TimeoutError:
                    pass  # one more offer each, then FeedSendTimeout
                except asyncio.CancelledError as error:
                    if not delivered:
                        # Nobody got it yet: withdraw it everywhere (a send that never was).
                        core._expire(timeout, 0, waiting, [])
                        raise
                    cancelled = error  # shielded: the rest of the channels still get it
            finally:
                dispatcher.discard(future)
    finally:
        for key in dispatcher.leave(registered):
            channel = registered[key]
            if not channel.released:
                channel.forget_sender(dispatcher.waker)
    core._count(delivered)
    if cancelled is not None:
        raise cancelled
    return delivered
