"""``FeedCore``: one feed segment in this process: its subscription table (changed under
the segment lock) and its send (the fan-out, under the send lock held for a whole send, so
every channel sees the values in one order; the C send of ``_accel.c`` for the common case).

A send encodes the value once, writes it into every subscribed channel's ring without
blocking, then waits, over all the channels that were full at once, until each took the
value or its subscription ended. Unsubscribing from any process wakes such a waiting send.
The public ``Feed`` (``_feed``) is a handle on one of these per process and feed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
import weakref
from typing import Any, Iterator, NamedTuple, Sequence

from . import _codec, _marks, _names, _process, _ring, _shm, _waker
from . import _layout as L
from ._native import ALL_DELIVERED, OFFER_ALL_DONE, FeedSendAnswer, SendPlan, dropped_by, stopped_at
from ._segment import AttachedSegment, open_named
from ._codec import Segments
from ._channel import display_type
from ._errors import (
    ChannelCorruptError, FeedClosed, FeedSendTimeout, FeedTypeError, ShmfeedError, SlowSubscriberError,
    TableFullError,
)
from ._subscription import encode_error

_OPEN_ATTEMPTS = 100


class _Target(NamedTuple):
    entry: int
    sub_id: int
    core: _ring.ChannelCore
    err_channel_id: int


class _Waiting(NamedTuple):
    """A full channel a send waits on, and the record it will write there."""

    target: _Target
    kind: int
    record: _ring.Payload


class _SkipCache(NamedTuple):
    """``targets_skipping``'s last answer: valid while ``source`` is still the feed's targets."""

    source: tuple[_Target, ...]
    skip_channel: int
    kept: tuple[_Target, ...]
    plan: SendPlan | None


def _channel_label(channel_id: int) -> str:
    """How errors name a channel: its hex id, as ``repr(channel)`` shows it."""
    return f"{channel_id:016x}"


_LARGE_OUTPUT = _codec.LARGE_OUTPUT  # a value encoded to more: the next send takes the large-value path

# The C loop over a feed's rings; without the accelerator _fast_plan is always None.
offer_all: Any = _ring._accel.offer_all if _ring._accel is not None else None
MARKED_RUN = 64  # marked sends one hold of the send lock covers (send_marked_many)
ACCEL_WORDS = (L.SEND_LOCK_OWNER, L.FEED_CLOSED, L.SUB_VERSION, L.SENDS, L.DELIVERED, L.LAST_SENDER_PID)


def _entry_word(entry: int) -> int:
    """Index of an entry's first word in the table view."""
    return entry * L.FEED_ENTRY_WORDS


class FeedCore(AttachedSegment):
    """This process's attachment to one feed segment."""

    kind = L.FEED_KIND

    def __init__(
        self, namespace: str, key: str, mapping: mmap.mmap, lock: Any, send_lock: Any
    ) -> None:
        self._setup_segment(namespace, _names.feed_segment(namespace, key), mapping)
        self.key = key
        self.table = self.buffer[L.HEADER_BYTES : L.FEED_SEGMENT_BYTES].cast("Q")
        self.lock = self.segment_lock = lock
        self.send_lock = send_lock
        name_len = int(self.words[L.NAME_LEN])
        self.name = L.read_text(self.buffer, L.FEED_NAME_OFFSET, name_len, L.FEED_NAME_MAX) if name_len else None
        self.type_name = ""
        self._targets_version = -1
        self._targets: tuple[_Target, ...] = ()
        self._channels: dict[int, _ring.ChannelCore] = {}
        # For the C send: (table version, targets, their C rings, the longest payload all of
        # them take inline), one tuple so that threads read it whole; None if a target has
        # no C ring.
        self._fast_plan: SendPlan | None = None
        # For a send that skips one channel (a bridge's injection, see ``send``): (the
        # targets it was derived from, the skipped channel id, the other targets, their
        # plan as ``_fast_plan``), one tuple so that threads read it whole.
        self._skip_cache: _SkipCache | None = None
        self._fast: Any = None  # the C send of the feed (see FeedCore.send)
        # While a marked send holds the send lock: (its mark entry's first word, the
        # subscription id limit, whether it resumes a dead bridge's send). See _marks.
        self._marking: tuple[int, int, bool] | None = None
        if _ring._accel is not None and not isinstance(send_lock, _shm.BoundedLock):
            send_lock_name = _names.lock_semaphore(namespace, int(self.words[L.SEND_LOCK_ID]))
            try:
                self._fast = _ring._accel.Feed(mapping, send_lock_name, L.HEADER_BYTES, ACCEL_WORDS)
            except OSError:
                pass  # destroyed meanwhile (its lock is gone): the Python path says so in time
        self._is_sender = False
        self._sigterm_mark: int | None = None  # see _register_sender
        self.users = 0  # Feed objects of this process bound to this core (see Feed.detach)
        self.large_values = False  # the last value sent from here was large (see _codec)
        self.lane_type: type | None = None  # a type whose name is the feed's (see Feed.send)
        self._refresh_type()

    # --- opening and lifetime -----------------------------------------------------------

    @classmethod
    def open_or_create(cls, namespace: str, key: str, name: str | None) -> "FeedCore":
        segment_name = _names.feed_segment(namespace, key)
        for _ in range(_OPEN_ATTEMPTS):
            core = cls._open(namespace, key, segment_name)
            if core is None:
                core = cls._create(namespace, key, segment_name, name)
            if core is not None:
                _feeds[(namespace, key)] = core
                return core
        raise ShmfeedError(f"shmfeed: could not open or create feed {name or key!r}; try again")

    @classmethod
    def exists(cls, namespace: str, key: str) -> bool:
        """Whether the feed's segment exists (or this process has it open)."""
        known = _feeds.get((namespace, key))
        if known is not None and not known.released:
            return True
        return os.path.exists(_names.shm_path(_names.feed_segment(namespace, key)))

    @classmethod
    def _open(cls, namespace: str, key: str, segment_name: str) -> "FeedCore | None":
        known = _feeds.get((namespace, key))
        if known is not None and not known.released:
            return known
        core = cls.map_unattached(namespace, key, lock_timeout=None)
        if core is None:
            return None
        if not core.join():
            core._close_local()
            return None
        return core

    @classmethod
    def map_unattached(
        cls, namespace: str, key: str, lock_timeout: float | None = _ring.RECOVERY_LOCK_TIMEOUT
    ) -> "FeedCore | None":
        """Map a feed without joining its attach slots (for the registry and gc).

        With ``lock_timeout`` (the default, for recovery) its locks give up after that many
        seconds with ``_shm.LockBusy``, and the channels it ends subscriptions on are opened
        the same way; ``_open`` passes None for ordinary blocking locks.
        """
        opened = open_named(namespace, _names.feed_segment(namespace, key), cls.kind)
        if opened is None:
            return None  # absent, or being destroyed right now
        mapping, (send_lock, lock) = opened
        if lock_timeout is not None:
            lock, send_lock = _shm.BoundedLock(lock, lock_timeout), _shm.BoundedLock(send_lock, lock_timeout)
        core = cls(namespace, key, mapping, lock, send_lock)
        core.attached = False
        return core

    @classmethod
    def _create(cls, namespace: str, key: str, segment_name: str, name: str | None) -> "FeedCore | None":
        lock_id, send_lock_id = _names.new_id(), _names.new_id()
        lock_name = _names.lock_semaphore(namespace, lock_id)
        send_lock_name = _names.lock_semaphore(namespace, send_lock_id)
        lock = _shm.create_semaphore(lock_name, 1)
        send_lock = _shm.create_semaphore(send_lock_name, 1)

        def initialise(mapping: mmap.mmap) -> None:
            buffer = memoryview(mapping)
            words = buffer[: L.HEADER_BYTES].cast("Q")
            L.init_common(words, L.FEED_MAGIC, lock_id)
            words[L.SEND_LOCK_ID] = send_lock_id
            if name is not None:
                words[L.NAME_LEN] = L.write_text(buffer, L.FEED_NAME_OFFSET, L.FEED_NAME_MAX, name)
            words.release()
            buffer.release()

        mapping = None
        try:
            mapping = _shm.create_segment(segment_name, L.FEED_SEGMENT_BYTES, initialise)
        finally:
            if mapping is None:  # failed, or another process published the feed first
                for name_, semaphore in ((lock_name, lock), (send_lock_name, send_lock)):
                    _shm.unlink_semaphore(name_)
                    semaphore.close()
        if mapping is None:
            return None  # the caller opens the other process's feed
        return cls(namespace, key, mapping, lock, send_lock)

    def reattach_after_fork(self) -> None:
        self._is_sender = False  # the child registers as a sender when it sends
        self._sigterm_mark = None  # the parent's (see _after_fork)
        super().reattach_after_fork()

    def _before_detach(self) -> None:
        self._stop_sending()
        if _feeds.get((self.namespace, self.key)) is self:
            _feeds.pop((self.namespace, self.key), None)
        self._channels.clear()
        self._targets = ()
        self._fast_plan = None
        self._skip_cache = None

    def _views(self) -> list[memoryview]:
        return [self.words, self.table, self.buffer]

    def _close_local(self) -> None:
        fast = getattr(self, "_fast", None)  # absent if __init__ failed early
        if fast is not None:
            fast.release()  # its hold on the mapping first, or the mapping stays
        super()._close_local()

    def lock_semaphores(self) -> list[Any]:
        return [self.send_lock, self.lock]

    # --- the element type ----------------------------------------------------------------

    def _refresh_type(self) -> None:
        length = int(self.words[L.FEED_TYPE_LEN])
        if length:
            self.type_name = L.read_text(self.buffer, L.TYPE_NAME_OFFSET, length, L.TYPE_NAME_MAX)

    def _fix_type_locked(self, type_name: str, operation: str) -> None:
        """Fix the feed's type to ``type_name`` if unset, else check it (lock held)."""
        self._refresh_type()
        if not self.type_name:
            self.words[L.FEED_TYPE_LEN] = L.write_text(self.buffer, L.TYPE_NAME_OFFSET, L.TYPE_NAME_MAX, type_name)
            self.type_name = type_name
        elif self.type_name != type_name:
            raise FeedTypeError(operation, display_type(type_name), display_type(self.type_name))

    def check_send_type(self, type_name: str, deadline: float | None = None) -> None:
        if type_name == self.type_name:
            return
        self.acquire(deadline)
        try:
            self._fix_type_locked(type_name, "Send")
        finally:
            self.release_lock()

    # --- the subscription table ------------------------------------------------------------

    def add_subscription(self, channel: _ring.ChannelCore, err_channel_id: int) -> tuple[int, int]:
        """Add an entry for ``channel``; returns ``(entry, sub_id)``."""
        words = self.words
        self.acquire()
        try:
            if words[L.FEED_CLOSED]:
                raise FeedClosed(
                    f"shmfeed: subscribe to closed feed {self._label()}; a closed feed stays closed: use another"
                )
            if channel.elem_type_name:
                self._fix_type_locked(channel.elem_type_name, "Subscribe")
            table = self.table
            high = L.table_high(words)
            entry = next((e for e in range(high) if table[_entry_word(e) + 3] & 0xFFFF_FFFF == L.SUB_FREE), high)
            if entry >= L.FEED_TABLE_SLOTS:
                raise TableFullError(
                    f"shmfeed: feed {self._label()} has {L.FEED_TABLE_SLOTS} subscriptions, the most it can "
                    f"hold; unsubscribe some first"
                )
            words[L.NEXT_SUB_ID] += 1
            sub_id = int(words[L.NEXT_SUB_ID])
            word = _entry_word(entry)
            table[word] = sub_id
            table[word + 1] = channel.channel_id
            table[word + 2] = err_channel_id
            table[word + 3] = L.SUB_ACTIVE_STATE | (_ring._pid << 32)
            words[L.TABLE_HIGH] = max(high, entry + 1)
            words[L.SUB_ACTIVE] += 1
            words[L.SUB_VERSION] += 1
            return entry, sub_id
        finally:
            self.release_lock()

    def is_active(self, entry: int, sub_id: int) -> bool:
        word = _entry_word(entry)
        table = self.table
        return table[word] == sub_id and table[word + 3] & 0xFFFF_FFFF == L.SUB_ACTIVE_STATE

    def _cancel_locked(self, entry: int, sub_id: int) -> bool:
        if not self.is_active(entry, sub_id):
            return False
        self.table[_entry_word(entry) + 3] = L.SUB_FREE
        self.words[L.SUB_ACTIVE] -= 1
        self.words[L.SUB_VERSION] += 1
        return True

    def end_subscription(
        self, entry: int, sub_id: int, channel_id: int, err_channel_id: int, error: BaseException | None = None
    ) -> bool:
        """Cancel one subscription, release sends waiting on it, close its error channel."""
        self.acquire()
        try:
            was_active = self._cancel_locked(entry, sub_id)
        finally:
            self.release_lock()
        if was_active:
            _finish(self.namespace, channel_id, err_channel_id, error, attach=self.attached)
        return was_active

    def end_subscription_at(self, entry: int, sub_id: int) -> bool:
        """``end_subscription`` of the subscription ``sub_id`` at table ``entry``, if it is
        still there (its channels read from the table)."""
        word = _entry_word(entry)
        if not 0 <= entry < L.FEED_TABLE_SLOTS or not self.is_active(entry, sub_id):
            return False
        return self.end_subscription(entry, sub_id, int(self.table[word + 1]), int(self.table[word + 2]))

    def close(self) -> None:
        words = self.words
        ended = []
        self.acquire()
        try:
            words[L.FEED_CLOSED] = 1
            for sub in L.active_subscriptions(words, self.table):
                if self._cancel_locked(sub.entry, sub.sub_id):
                    ended.append((sub.channel_id, sub.err_channel_id))
        finally:
            self.release_lock()
        for channel_id, err_channel_id in ended:
            _finish(self.namespace, channel_id, err_channel_id, None, attach=self.attached)

    @property
    def closed(self) -> bool:
        return bool(self.words[L.FEED_CLOSED])

    def targets(self, deadline: float | None = None) -> tuple[_Target, ...]:
        """The active subscriptions, re-read only when the table changed."""
        version = self.words[L.SUB_VERSION]
        if version == self._targets_version:
            return self._targets
        words = self.words
        self.acquire(deadline)
        try:
            version = words[L.SUB_VERSION]
            entries = L.active_subscriptions(words, self.table)
        finally:
            self.release_lock()
        targets, channels, gone = [], {}, []
        for entry, sub_id, channel_id, err_channel_id, _owner in entries:
            core = self._channels.get(channel_id)
            error: ChannelCorruptError | None = None
            if core is None or core.released:
                try:
                    core = _ring.ChannelCore.open(self.namespace, channel_id, deadline)
                except ChannelCorruptError as corrupt:  # its header is not valid: ends this subscription only
                    core, error = None, corrupt
            if core is None:
                gone.append((entry, sub_id, channel_id, err_channel_id, error))
                continue
            channels[channel_id] = core
            targets.append(_Target(entry, sub_id, core, err_channel_id))
        self._channels = channels
        self._targets = tuple(targets)
        rings = tuple(target.core._fast for target in targets)
        inline_limit = min((target.core.inline_limit for target in targets), default=-1)
        self._fast_plan = SendPlan(version, self._targets, rings, inline_limit) if rings and None not in rings else None
        self._targets_version = version
        for entry, sub_id, channel_id, err_channel_id, error in gone:
            self.end_subscription(entry, sub_id, channel_id, err_channel_id, error)
        return self._targets

    def targets_skipping(self, skip_channel: int,
                         deadline: float | None = None) -> tuple[tuple[_Target, ...], SendPlan | None]:
        """The active subscriptions but those of channel ``skip_channel``, and their C
        send plan (or None), derived from ``targets()`` and kept until it changes."""
        targets = self.targets(deadline)
        cached = self._skip_cache
        if cached is not None and cached.source is targets and cached.skip_channel == skip_channel:
            return cached.kept, cached.plan
        kept = tuple(target for target in targets if target.core.channel_id != skip_channel)
        plan = self._fast_plan
        if plan is not None and plan.targets is targets and kept:
            rings = tuple(target.core._fast for target in kept)
            plan = SendPlan(plan.version, kept, rings, min(target.core.inline_limit for target in kept))
        else:
            plan = None
        self._skip_cache = _SkipCache(targets, skip_channel, kept, plan)
        return kept, plan

    # --- sending --------------------------------------------------------------------------

    def _register_sender(self) -> None:
        """Flag our attach slot as a sender's (see ``_layout``): its death now fails
        subscriptions, unless it detaches normally first.

        In a multiprocessing child, SIGTERM (``Pool.terminate``, the end of a ``with
        Pool(...)`` block) clears the flag before the process dies (see ``_accel.c``): a
        terminated worker stopped sending, it did not crash. Without the C accelerator
        such a worker counts as a sender that died.
        """
        self.check_usable()
        if not L.set_own_flag(self.words, L.SLOT_SENDER, True):
            raise ShmfeedError(f"shmfeed: this process is not attached to feed {self._label()}; open the feed again")
        self._is_sender = True
        accel = _ring._accel
        if accel is not None and self._sigterm_mark is None and _process.in_multiprocessing_child():
            if accel.catch_sigterm():
                self._sigterm_mark = accel.mark_sender(self.mapping, L.own_slot(self.words) * 8, L.SLOT_SENDER)

    def _stop_sending(self) -> None:
        """Before detaching: clear our sender flag, then take back its SIGTERM mark (in this
        order, so that a SIGTERM at any moment leaves the flag cleared)."""
        if self._is_sender:
            L.set_own_flag(self.words, L.SLOT_SENDER, False)
            self._is_sender = False
        mark, self._sigterm_mark = self._sigterm_mark, None
        if mark is not None and _ring._accel is not None:
            _ring._accel.unmark_sender(mark)

    def send(
        self, payload: _ring.Encoded, deadline: float | None = None, timeout: float | None = None,
        skip_channel: int = 0, as_sender: bool = True, mark: _marks.Mark | None = None,
        wakes: dict[int, _ring.ChannelCore] | None = None,
    ) -> int:
        """Deliver one encoded value to every subscribed channel; returns how many took it.

        ``deadline`` (a ``time.monotonic()`` value, ``timeout`` seconds from the call)
        bounds every wait: the feed's locks, each ring's locks, the wait on full channels.
        ``skip_channel`` (a channel id; 0, no channel has it, skips nothing) leaves that
        channel's subscriptions out of this one send: a bridge injects what it got from
        NATS without getting it back on its own subscription (no echo, see ``_bridge``).
        ``as_sender=False`` sends without flagging this process as one of the feed's
        senders: a bridge relays other hosts' values, so its death must fail nobody's
        subscription (SPEC §7). The send is otherwise the same (one send lock, one order
        for every channel).
        ``mark`` makes it a durable bridge's marked send (see ``_marks``): it answers
        ``_marks.ALREADY_APPLIED`` for a value this mark's owner delivered before, and
        resumes one a killed bridge delivered to only some channels.
        ``wakes`` (``send_many``'s): the channels whose sleeping receivers this send wrote
        to are put there, to be woken once for the batch, instead of now.

        Raises:
            FeedSendTimeout: the send could not finish by ``deadline``.
        """
        try:
            if as_sender and not self._is_sender:
                self._register_sender()
            if mark is not None:
                return self._send_marked(payload, mark, deadline, timeout, skip_channel)
            plan = self._fast_plan
            if skip_channel:
                cached = self._skip_cache  # valid while it was derived from the current targets
                if cached is None or cached.source is not self._targets or cached.skip_channel != skip_channel:
                    plan = None
                else:
                    plan = cached.plan
            fast = self._fast
            if plan is not None and fast is not None and len(payload) <= plan.inline_limit:
                if isinstance(payload, Segments):
                    payload = payload.join()  # inline in every ring
                # All of it in C when nothing unusual happens (see _accel.c, Feed.send, and
                # FeedSendAnswer for what it answers and which answers leave the send lock
                # held); the finally lets go of the lock whatever happens from the moment
                # the call returns.
                try:
                    if wakes is None:
                        answer = fast.send(plan.rings, payload, _ring._pid, plan.version)
                    else:
                        deferred: list[int] = []  # rings that took it and whose receivers sleep
                        answer = fast.send(plan.rings, payload, _ring._pid, plan.version, deferred)
                        _defer_wakes(plan, deferred, wakes)
                    if answer <= ALL_DELIVERED:  # all settled; full drop_newest rings dropped it
                        return len(plan.rings) - dropped_by(answer)
                    if answer >= 0:  # stopped at a ring, the lock held: on from there in Python
                        return self._send_locked(payload, plan, answer, deadline, timeout, skip_channel,
                                                 fast.dropped(), wakes)
                finally:
                    fast.unlock_if_held()
            words = self.words
            send_lock = self.send_lock
            if not send_lock.acquire_by(deadline):
                raise _shm.lock_timeout(f"the send lock of feed {self._label()}", int(words[L.SEND_LOCK_OWNER]))
            words[L.SEND_LOCK_OWNER] = _ring._pid
            try:
                return self._send_locked(payload, None, -1, deadline, timeout, skip_channel, wakes=wakes)
            finally:
                words[L.SEND_LOCK_OWNER] = 0
                send_lock.release()
        except FeedSendTimeout:
            raise
        except TimeoutError as error:
            # A lock wait before any ring was written (_send_locked turns every later one
            # into a FeedSendTimeout): no channel got the value.
            raise self.nobody_reached(timeout, error) from error

    def send_value(self, value: Any) -> int | None:
        """``Feed.send``'s short path (no deadline): a value of the common types encoded and
        sent by one C call (``Feed.send_value``) once this process is a sender, and from
        where it stopped in Python as ``send`` goes on; None, having done nothing, for a
        value of other types (``Feed.send`` then takes its whole path)."""
        plan, fast = self._fast_plan, self._fast
        if plan is None or fast is None or not self._is_sender:  # no C send: encoded, then the whole send
            answer = _codec.encode_common(value)
            if answer is None:
                return None
        else:
            try:
                answer = fast.send_value(value, plan, _ring._pid, _LARGE_OUTPUT)
                if answer.__class__ is int or answer is None:
                    return answer  # type: ignore[no-any-return]
                if answer.__class__ is tuple:  # stopped at a ring, the lock held (see Feed.send_value)
                    try:
                        return self._send_locked(answer[0], plan, answer[1], None, None, 0, fast.dropped())
                    finally:
                        fast.unlock_if_held()
            except BaseException:
                fast.unlock_if_held()  # whatever was raised, even as the C call returned: not left held
                raise
        # Encoded, not sent in C (no C send, too big to go inline, large, the lock busy).
        self.large_values = len(answer) > _LARGE_OUTPUT
        return self.send(answer)

    @contextlib.contextmanager
    def sends_held(self, deadline: float | None) -> Iterator[memoryview]:
        """Hold the feed's send lock: no send of any process is under way or starts
        meanwhile, so a change of the table made inside and SENDS read inside fall between
        two sends (a bridge that stops and starts subscribing while NATS is away counts
        exactly the sends it missed). Yields the header words.

        Raises:
            TimeoutError: the lock stayed held by another process until ``deadline``.
        """
        words = self.words
        if not self.send_lock.acquire_by(deadline):
            raise _shm.lock_timeout(f"the send lock of feed {self._label()}", int(words[L.SEND_LOCK_OWNER]))
        words[L.SEND_LOCK_OWNER] = _ring._pid
        try:
            yield words
        finally:
            words[L.SEND_LOCK_OWNER] = 0
            self.send_lock.release()

    def _send_marked(self, payload: _ring.Encoded, mark: _marks.Mark, deadline: float | None,
                     timeout: float | None, skip_channel: int) -> int:
        """A marked send (see ``_marks``): the Python path (each channel's mark is set as it
        settles), the mark read and written under the send lock."""
        with self.sends_held(deadline) as words:
            return self._marked_locked(words, payload, mark, deadline, timeout, skip_channel)

    def send_many(self, payloads: Sequence[_ring.Encoded], deadline: float | None = None,
                  timeout: float | None = None) -> list[int]:
        """``send`` of each payload, in order; returns how many channels took each. A
        receiver asleep on one of the channels is woken once for the batch (at its end, or
        before a send waits for room in a full channel: its receiver may be the sleeper),
        not once per value: it then takes the batch in one go instead of waking, taking one
        value and sleeping again.

        Raises:
            FeedSendTimeout, FeedClosed: as ``send``, for the value it was sending; the
                error's ``values_sent`` says how many before it were sent.
        """
        delivered: list[int] = []
        wakes: dict[int, _ring.ChannelCore] = {}
        payloads = list(payloads)
        if payloads and not self._is_sender:  # as send: a sender from its first value on
            self._register_sender()
        try:
            while len(delivered) < len(payloads):
                if not self._send_batch_fast(payloads, delivered, deadline, timeout, wakes):
                    delivered.append(self.send(payloads[len(delivered)], deadline, timeout, wakes=wakes))
        except (FeedSendTimeout, FeedClosed) as error:
            error.values_sent = len(delivered)  # type: ignore[union-attr]
            raise
        finally:
            _wake_receivers(wakes)
        return delivered

    def _send_batch_fast(self, payloads: list[_ring.Encoded], delivered: list[int], deadline: float | None,
                         timeout: float | None, wakes: dict[int, _ring.ChannelCore]) -> bool:
        """The values of ``payloads`` from ``len(delivered)`` on, in C under one hold of the
        send lock (``_accel.Feed.send_batch``) as far as it goes, and the value it stopped
        at finished in Python if it stopped at a ring; each one sent has its count appended
        to ``delivered``. False if it sent nothing: the caller sends the next value alone."""
        plan, fast = self._fast_plan, self._fast
        if plan is None or fast is None:
            return False
        start = len(delivered)
        deferred: list[int] = []  # rings that took values and whose receivers sleep
        try:
            # Why it stopped comes with where (not from the object, which another thread's
            # send_batch on this feed resets the moment this thread runs Python code).
            reached, stop, dropped = fast.send_batch(plan.rings, payloads, start, _ring._pid, plan.version,
                                                     plan.inline_limit, deferred, delivered)
            _defer_wakes(plan, deferred, wakes)
            if reached < len(payloads) and stop != FeedSendAnswer.LOCK_BUSY:  # at a ring, the lock held
                delivered.append(self._send_locked(payloads[reached], plan, stop, deadline, timeout, 0, dropped,
                                                   wakes))
                return True
        finally:
            fast.unlock_if_held()
        return reached > start

    def send_marked_many(self, items: Sequence[tuple[_ring.Encoded, _marks.Mark]], skip_channel: int,
                         ) -> list[int | ShmfeedError | OSError]:
        """Marked sends of several values, in order, holding the send lock once for up to
        ``MARKED_RUN`` of them (a durable bridge's injector: one lock round trip, not one
        per value). Each value is marked, delivered and finished exactly as by its own
        ``send(mark=...)``; holding the lock between them only keeps other senders out a
        little longer. No deadline (the bridge's sends have none).

        Returns, per value, what its own send returns (``_marks.ALREADY_APPLIED`` for one
        delivered before), or the ``ShmfeedError``/``OSError`` it would raise: the later
        values are still sent, as they would be by sends of their own. Any other error
        ends the call (the lock let go of), as it would end the caller's loop of sends.
        """
        answers: list[int | ShmfeedError | OSError] = []
        for start in range(0, len(items), MARKED_RUN):
            with self.sends_held(None) as words:
                for payload, mark in items[start:start + MARKED_RUN]:
                    try:
                        answers.append(self._marked_locked(words, payload, mark, None, None, skip_channel))
                    except (ShmfeedError, OSError) as error:
                        answers.append(error)
        return answers

    def _marked_locked(self, words: memoryview, payload: _ring.Encoded, mark: _marks.Mark,
                       deadline: float | None, timeout: float | None, skip_channel: int) -> int:
        """One marked send, the send lock held."""
        first = _marks.entry_word(words, mark.key)
        begun = _marks.begin(words, first, mark.sequence)
        if begun is None:
            return _marks.ALREADY_APPLIED
        sub_limit, resuming = begun
        self._marking = (first, sub_limit, resuming)
        try:
            delivered = self._send_locked(payload, None, -1, deadline, timeout, skip_channel)
        finally:
            self._marking = None
        _marks.finish(words, first, mark.sequence)
        return delivered

    def _settled(self, target: _Target) -> None:
        """A marked send's ``target`` settled the value (send lock held)."""
        marking = self._marking
        if marking is not None:
            _marks.settled(self.words, marking[0], target.entry)

    def nobody_reached(self, timeout: float | None, error: TimeoutError) -> FeedSendTimeout:
        """The error of a send whose ``error`` (a lock wait) came before any delivery."""
        pending = [  # read without the lock: a torn read only misnames a channel
            (_channel_label(sub.channel_id), "not reached") for sub in L.active_subscriptions(self.words, self.table)
        ]
        return FeedSendTimeout.of_send(self._label(), timeout, 0, pending, str(error).removeprefix("shmfeed: "))

    def _send_locked(self, payload: _ring.Encoded, plan: SendPlan | None, answer: int, deadline: float | None,
                     timeout: float | None, skip_channel: int = 0, dropped_in_c: int = 0,
                     wakes: dict[int, _ring.ChannelCore] | None = None) -> int:
        """The send, with the feed's send lock held (see ``first_pass``); the wait on full
        channels blocks this thread. ``dropped_in_c``: rings before the one the C send
        stopped at that dropped the value (full, drop_newest). ``wakes``: see ``first_pass``;
        they are woken before any wait for room."""
        delivered, waiting, spill = self.first_pass(payload, plan, answer, deadline, timeout, skip_channel,
                                                    dropped_in_c, wakes)
        try:
            if waiting:
                if wakes:
                    _wake_receivers(wakes)
                got, locked = self._send_waiting(waiting, deadline)
                delivered += got
                if waiting:  # the deadline passed first
                    pending = [(entry.target, "locked" if entry.target is locked else "full") for entry in waiting]
                    raise self._expire(timeout, delivered, waiting, pending)
            self._count(delivered)
            return delivered
        finally:
            if spill is not None:
                spill.close()

    def first_pass(
        self, payload: _ring.Encoded, plan: SendPlan | None, answer: int, deadline: float | None,
        timeout: float | None,
        skip_channel: int = 0,
        dropped_in_c: int = 0,
        wakes: dict[int, _ring.ChannelCore] | None = None,
    ) -> tuple[int, list[_Waiting], _ring.Spill | None]:
        """The send, with the feed's send lock held: from the start (``answer`` -1), or
        from where the C send stopped (``answer`` as ``offer_all``'s, on ``plan``: see
        ``_native.stopped_at``; ``dropped_in_c`` of the rings before it dropped the value).

        A ring lock still held by someone else at ``deadline`` ends the pass at that ring:
        the rings that took the value keep it, every other copy is withdrawn, and
        ``FeedSendTimeout`` says which is which.

        Writes every channel that has room and never waits for room: returns how many
        took the value, the full channels still to wait on (with their records), and the
        spill file to close once the send is over (None if the value went inline).
        ``wakes`` (a batch's): the channels whose receivers sleep and that the C loop wrote
        to are put there, by channel id, to be woken once later, instead of now.
        """
        words = self.words
        size = len(payload)
        spill: _ring.Spill | None = None
        try:
            if answer == -1:
                if words[L.FEED_CLOSED]:
                    raise FeedClosed(
                        f"shmfeed: send on closed feed {self._label()}; a closed feed stays closed: use another"
                    )
                if skip_channel:
                    targets, plan = self.targets_skipping(skip_channel, deadline)
                else:
                    targets = self.targets(deadline)  # a TimeoutError here: nobody got the value yet
                    plan = self._fast_plan
                    if plan is not None and plan.targets is not targets:
                        plan = None  # rebuilt meanwhile by another thread: the Python loop
            else:
                assert plan is not None
                targets = plan.targets  # the C send went through it (it checked the version)
            marking = self._marking
            inline_everywhere = False  # known without a look at each target
            if marking is not None:
                inline_everywhere = plan is not None and size <= plan.inline_limit
                plan = None  # the Python loop: it marks each channel as it settles
                first, sub_limit, resuming = marking
                if resuming:  # only those a killed bridge had not reached, and not newer ones
                    targets = tuple(t for t in targets if t.sub_id <= sub_limit
                                    and not _marks.is_settled(words, first, t.entry))
            delivered = -dropped_in_c  # the rings before the one in hand that took it are counted below
            waiting: list[_Waiting] = []
            reached = 0  # the target in hand; those before it are settled
            try:
                if plan is not None and size <= plan.inline_limit:
                    if isinstance(payload, Segments):
                        payload = payload.join()  # inline in every ring
                    rings = plan.rings
                    # The C loop writes to every ring it can and stops at each one that needs
                    # more: a wake-up, or the Python path (full, closed, locked, ...).
                    if answer == -1:
                        answer = offer_all(rings, payload, _ring._pid, 0)
                    while answer != OFFER_ALL_DONE:
                        ring, took = stopped_at(answer)
                        delivered += ring - reached  # the rings before it took it in C
                        reached = ring
                        target = targets[reached]
                        if took:
                            delivered += 1
                            if wakes is None:
                                target.core._wake(L.RECV_WAITLIST_WORD, L.RECV_WAITING)
                            else:
                                wakes[target.core.channel_id] = target.core
                        else:
                            outcome = target.core.offer(_ring.KIND_DATA, payload, None, deadline)
                            delivered += self._settle(target, outcome, _ring.KIND_DATA, payload, waiting, deadline)
                        reached += 1
                        answer = offer_all(rings, payload, _ring._pid, reached)
                    delivered += len(targets) - reached
                else:
                    if not inline_everywhere and any(size > target.core.inline_limit for target in targets):
                        # Written before any ring takes the value: a full /dev/shm fails the
                        # whole send here (ENOSPC), having delivered it to nobody.
                        spill = _ring.Spill(self.namespace, payload)
                        spill.write()
                    for reached, target in enumerate(targets):
                        core = target.core
                        if size <= core.inline_limit:
                            if isinstance(payload, Segments):
                                payload = payload.join()  # inline here (and wherever else it fits)
                            kind, record = _ring.KIND_DATA, payload
                        else:
                            assert spill is not None  # written above
                            kind = _ring.KIND_SPILL
                            record = _ring.SPILL_REFERENCE.pack(*spill.link_into(core.namespace, core.channel_id))
                        try:
                            mark = None  # a spill record's bit is set below, as on the Python path
                            if marking is not None and kind == _ring.KIND_DATA:
                                mark = _marks.word_and_bit(words, marking[0], target.entry)
                            outcome = core.offer_fast(record, deadline, mark, kind)
                            delivered += self._settle(target, outcome, kind, record, waiting, deadline)
                            if marking is not None and not (waiting and waiting[-1].target is target):
                                self._settled(target)
                        except TimeoutError:
                            _discard_record(core, kind, record)  # its own spill link, if any
                            raise
            except TimeoutError as error:
                pending = [(entry.target, "full") for entry in waiting] + [(targets[reached], "locked")]
                pending += [(target, "not reached") for target in targets[reached + 1 :]]
                raise self._expire(timeout, delivered, waiting, pending) from error
        except BaseException:
            if spill is not None:
                spill.close()
            raise
        return delivered, waiting, spill

    def _count(self, delivered: int) -> None:
        """Count one send that reached ``delivered`` channels (feed send lock held)."""
        words = self.words
        words[L.SENDS] += 1
        words[L.DELIVERED] += delivered
        words[L.LAST_SENDER_PID] = _ring._pid

    def _expire(
        self, timeout: float | None, delivered: int, waiting: list[_Waiting], pending: list[tuple[_Target, str]]
    ) -> FeedSendTimeout:
        """End a send that ran out of time (feed send lock held): withdraw the copies still
        waiting, count what was delivered, and say who got the value and who did not."""
        for entry in waiting:
            _discard_record(entry.target.core, entry.kind, entry.record)
        if delivered:
            self._count(delivered)  # a send that reached nobody is not counted at all
        labelled = [(_channel_label(target.core.channel_id), why) for target, why in pending]
        return FeedSendTimeout.of_send(self._label(), timeout, delivered, labelled)

    def _settle(
        self, target: _Target, outcome: int, kind: int, record: _ring.Payload, waiting: list[_Waiting],
        deadline: float | None,
    ) -> int:
        """Act on one target's first offer; 1 if it took the value (feed send lock held)."""
        if outcome == _ring.DELIVERED:
            return 1
        core = target.core
        if outcome == _ring.FULL:
            if core.overflow == "evict":
                self._evict(target, deadline)
                _discard_record(core, kind, record)
            else:
                waiting.append(_Waiting(target, kind, record))  # delivered (or not) by _send_waiting
        else:
            if outcome == _ring.CLOSED:
                self._end(target)
            _discard_record(core, kind, record)
        return 0

    def _send_waiting(self, waiting: list[_Waiting], deadline: float | None) -> tuple[int, _Target | None]:
        """Wait until each full channel took the value or its subscription ended, or until
        ``deadline``. Returns how many took it, and the target whose lock was still held at
        the deadline, if any; ``waiting`` is left holding the channels that did not get it.
        """
        waker = _waker.current_waker(self.namespace)
        delivered = 0
        registered = [entry.target.core for entry in waiting]
        try:
            while waiting:
                got, locked = self.offer_waiting(waiting, waker, deadline)
                delivered += got
                if locked is not None:
                    return delivered, locked
                if waiting:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break  # one last offer each came after the deadline: still full
                    waker.wait(remaining)
        finally:
            for core in registered:
                if not core.released:
                    core.forget_sender(waker)
            waker.drain()
        return delivered, None

    def offer_waiting(
        self, waiting: list[_Waiting], waker: _waker.Waker, deadline: float | None
    ) -> tuple[int, _Target | None]:
        """One offer to each full channel a send waits on (feed send lock held), ``waker``
        registered in those still full. Returns how many took the value, and the target
        whose lock was still held at ``deadline`` (the pass stops there), if any;
        ``waiting`` is left holding the channels that did not get it. Never waits for room.
        """
        delivered = 0
        still: list[_Waiting] = []
        full: set[int] = set()  # channels found full in this pass
        for index, entry in enumerate(waiting):
            target, kind, record = entry
            core = target.core
            if not self.is_active(target.entry, target.sub_id) or self.closed:
                _discard_record(core, kind, record)
                self._settled(target)
                continue
            if core.channel_id in full:
                # A channel subscribed twice, full for the copy before: offered again, it
                # would take ``waker`` out of the wait list (each offer does, first), then
                # might take this copy while the one before waits unregistered: lost.
                still.append(entry)
                continue
            try:
                outcome = core.offer(kind, record, waker, deadline)
            except TimeoutError:
                waiting[:] = still + waiting[index:]  # this one and the rest stay out
                return delivered, target
            if outcome == _ring.DELIVERED:
                delivered += 1
            elif outcome == _ring.FULL:
                # Re-checked after registering: an unsubscribe in between wakes us.
                if self.is_active(target.entry, target.sub_id) and not self.closed:
                    still.append(entry)
                    full.add(core.channel_id)
                    continue
                _discard_record(core, kind, record)
            else:
                if outcome == _ring.CLOSED:
                    self._end(target)
                _discard_record(core, kind, record)
            self._settled(target)
        waiting[:] = still
        return delivered, None

    def _end(self, target: _Target) -> None:
        self.end_subscription(target.entry, target.sub_id, target.core.channel_id, target.err_channel_id)

    def _evict(self, target: _Target, deadline: float | None = None) -> None:
        core = target.core
        core.acquire(deadline)  # a TimeoutError leaves it subscribed: the send did not reach it
        try:
            core.words[L.EVICTED] += 1
        finally:
            core.release_lock()
        error = SlowSubscriberError(
            f"shmfeed: channel {core.channel_id:016x} was full and its overflow policy is 'evict'; "
            f"resubscribe to receive again"
        )
        self.end_subscription(target.entry, target.sub_id, core.channel_id, target.err_channel_id, error)

    def encode(self, value: Any) -> _ring.Encoded:
        """``value`` encoded for this feed's rings (large-value buffering as the last one
        needed). Raises ``EncodingError``."""
        payload = _codec.encode_for_send(value, self.large_values)
        self.large_values = len(payload) > _codec.LARGE_OUTPUT
        return payload

    def _label(self) -> str:
        return repr(self.name) if self.name is not None else f"<anonymous {self.key}>"

    def describe(self) -> str:
        return f"feed {self._label()}"


def _defer_wakes(plan: SendPlan, deferred: list[int], wakes: dict[int, _ring.ChannelCore]) -> None:
    """Put the channels of the C send's ``deferred`` ring indices in ``wakes``."""
    for index in deferred:
        core = plan.targets[index].core
        wakes[core.channel_id] = core


def _wake_receivers(wakes: dict[int, _ring.ChannelCore]) -> None:
    """Wake the receivers of the channels a batch put in ``wakes`` (and forget them)."""
    while wakes:
        _, core = wakes.popitem()
        if not core.released:
            core._wake(L.RECV_WAITLIST_WORD, L.RECV_WAITING)


def _discard_record(core: _ring.ChannelCore, kind: int, record: _ring.Payload) -> None:
    if kind == _ring.KIND_SPILL:
        core._unlink_spill_record(record)


def _finish(
    namespace: str, channel_id: int, err_channel_id: int, error: BaseException | None, attach: bool = True
) -> None:
    """After a subscription ended: wake sends waiting on its channel, close its err().

    ``attach=False`` (the registry) maps the channels without joining them, with bounded locks.
    """
    open_channel = _ring.ChannelCore.open if attach else _ring.ChannelCore.map_unattached

    def opened(channel_id: int) -> _ring.ChannelCore | None:
        try:
            return open_channel(namespace, channel_id)
        except ChannelCorruptError:
            return None  # its header is bad: nobody can use it, so nothing to wake or tell

    channel = opened(channel_id)
    if channel is not None:
        try:
            channel.wake_senders()
        finally:
            if not attach:
                channel.release()
    err_channel = opened(err_channel_id)
    if err_channel is not None:
        try:
            if error is not None:
                # Not put(..., 0): that would give up on a lock held for a moment and lose
                # the error. Full (an error is there already) or closed: nothing to add.
                err_channel.put_if_room(encode_error(error))
            err_channel.close()
        finally:
            if not attach:
                err_channel.release()


# This process's feed cores, by (namespace, key): one per feed (see FeedCore.open_or_create).
_feeds: "weakref.WeakValueDictionary[tuple[str, str], FeedCore]" = weakref.WeakValueDictionary()

