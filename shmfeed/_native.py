"""The optional C accelerator (``_accel.c``), loaded once for every module that uses it.

``accel`` is the extension module, or None when it was not built, when the machine is
big-endian (the C code writes record headers in native order), or when
``SHMFEED_PURE_PYTHON=1`` asks for the Python path (the tests run both).

The C feed send's inputs and answers have names here (``SendPlan``, ``FeedSendAnswer``,
``OFFER_ALL_DONE``, ``stopped_at``): both sides read them from this one place.
"""

from __future__ import annotations

import enum
import os
import sys
from typing import Any, NamedTuple

PURE_PYTHON_ENV = "SHMFEED_PURE_PYTHON"


def _load() -> Any:
    if os.environ.get(PURE_PYTHON_ENV) or sys.byteorder != "little":
        return None
    try:
        from . import _accel  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _accel


accel: Any = _load()


# --- what crosses the C boundary of a feed send (see _accel.c: Feed.send, offer_all) -------


class SendPlan(NamedTuple):
    """What the C feed send is given: the subscription table's version it was built from
    (the C send checks it under the feed's send lock), the targets (``_feed_core._Target``) in
    table order, their C rings in the same order, and the largest value that goes inline
    in every one of them."""

    version: int
    targets: tuple[Any, ...]
    rings: tuple[Any, ...]
    inline_limit: int


class FeedSendAnswer(enum.IntEnum):
    """What ``_accel.Feed.send`` answers besides a ring's place.

    Any answer ``i >= 0`` is ``offer_all``'s (below): the C send stopped at a ring and
    **still holds the feed's send lock**: the Python send goes on from that ring under it
    and lets go of it (``unlock_if_held``) whatever happens. The two answers here hold no
    lock."""

    ALL_DELIVERED = -2  # every ring took the value, nobody to wake: the send is over
    # The feed's send lock was busy (or its plan is stale): nothing was done; the Python
    # send waits for it. ``Feed.send_batch`` answers it too for a value the batch left
    # alone (not an inline ``bytes``): the Python send sends it.
    LOCK_BUSY = -1


# FeedSendAnswer.ALL_DELIVERED as a plain int, for the send's own comparisons: an enum
# member's lookup and arithmetic cost 70 ns a send.
ALL_DELIVERED = int(FeedSendAnswer.ALL_DELIVERED)


def dropped_by(answer: int) -> int:
    """How many full ``drop_newest`` rings dropped the value in a C feed send that answered
    ``answer <= FeedSendAnswer.ALL_DELIVERED`` (all settled; the others took it). A send
    that stopped at a ring says it with ``Feed.dropped()``, for the rings before it."""
    return ALL_DELIVERED - answer


# offer_all(rings, payload, pid, start): OFFER_ALL_DONE when rings[start:] all took the
# value and nobody waits on them; else 2*i + 1 if ring i took it and its receivers wait
# (the caller wakes them), or 2*i if ring i did not take it (the Python offer decides).
OFFER_ALL_DONE = -1


def stopped_at(answer: int) -> tuple[int, bool]:
    """Where ``offer_all`` (or a C feed send answering i >= 0) stopped: the ring's place,
    and whether that ring took the value (its receivers to wake)."""
    return answer >> 1, bool(answer & 1)
