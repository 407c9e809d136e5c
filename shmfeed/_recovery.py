"""Repairing a namespace after processes died: the registry's and ``shmfeed gc``'s work.

Everything a process shares lives in shared memory, so recovery needs no record of its
own: it reads each segment and, for every process that is gone,

- releases a lock it held (its pid is in the lock's owner word) and, for a channel's send
  or receive lock, recounts the messages so that a half-finished counter update is undone
  (records themselves are committed by one store, so none is ever half there);
- takes its wakers out of the wait lists;
- ends the feed subscriptions it made, which releases sends waiting on their channels;
- fails, with ``SenderDiedError``, the subscriptions of a feed whose every sender is dead;
- removes it from the attach slots, and unlinks a segment no live process is attached to.

Channels, feeds and named scopes take the same steps (``_recover_segment``): their locks are
walked through their kind's description (``_layout.SEGMENT_KINDS``), each taken with the
bounded ``_ring.RECOVERY_LOCK_TIMEOUT``, and an orphaned segment is unlinked by its own
``unlink_names`` (locks first, segment last). Only what a kind has of its own differs.
All of this is idempotent, so a registry that is killed half-way is simply redone by the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from . import _gc
from . import _layout as L
from . import _names, _outbox, _process, _ring
from ._errors import SenderDiedError
from ._feed_core import FeedCore
from ._names import Entry, EntryKind
from ._scope import _SharedScope
from ._segment import AttachedSegment


SUSPECT_CHECKS = 3  # passes, at least SCAN apart, that must see a lock held by nobody


class Liveness:
    """Answers "is this process alive?", each pid looked up once per pass.

    It also carries ``suspects`` from pass to pass: locks seen taken (value 0) with no
    owner recorded while a process attached to the segment was dead. A process killed
    between taking a lock and writing its pid leaves exactly that; a live holder writes its
    pid within nanoseconds, so a lock seen ownerless by several passes was orphaned.
    """

    def __init__(self, suspects: dict[tuple[str, int], int] | None = None) -> None:
        self._ticks: dict[int, int | None] = {}
        self.suspects = suspects if suspects is not None else {}

    def ticks(self, pid: int) -> int | None:
        if pid not in self._ticks:
            self._ticks[pid] = _process.start_ticks(pid) if pid > 0 else None
        return self._ticks[pid]

    def alive(self, pid: int, ticks: int) -> bool:
        """Whether the process recorded as ``(pid, ticks)`` lives (``_layout.slot_alive``)."""
        return L.slot_alive(pid, ticks, self._matches)

    def _matches(self, pid: int, ticks: int) -> bool:
        return _process.matches(self.ticks(pid), ticks)

    def owner_alive(self, pid: int, attached: list[tuple[int, int]]) -> bool:
        """Whether the pid in a lock's owner word is alive (its start time from the slots)."""
        for slot_pid, slot_ticks in attached:
            if slot_pid == pid:
                return self.alive(slot_pid, slot_ticks)
        return self.ticks(pid) is not None


@dataclass
class Repairs:
    """What one pass did, for logs and for ``shmfeed gc``'s report."""

    released_locks: list[str] = field(default_factory=list)
    ended_subscriptions: int = 0
    failed_subscriptions: int = 0
    destroyed: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.released_locks or self.ended_subscriptions or self.failed_subscriptions
            or self.destroyed or self.removed_files
        )


def recover_namespace(namespace: str, liveness: Liveness | None = None) -> Repairs:
    """One full recovery pass over the namespace."""
    liveness = liveness or Liveness()
    repairs = Repairs()
    for entry in _gc.own_entries(namespace):
        steps = _SEGMENT_STEPS.get(entry.kind)
        if steps is None:
            continue
        try:
            core = steps.map_unattached(namespace, entry)
            if core is not None:
                _recover_segment(core, steps, liveness, repairs)
        except Exception:  # noqa: BLE001 - see below
            # Gone meanwhile, a lock still taken (LockBusy: retried next pass), or bytes that
            # make no sense (shared memory is never trusted): the other segments are still
            # recovered, and the sweep below judges a damaged one by its attach slots.
            continue
    repairs.removed_files += _gc.sweep(namespace).all()
    return repairs


def _recover_segment(core: AttachedSegment, steps: "_Steps", liveness: Liveness, repairs: Repairs) -> None:
    """The steps every segment takes: its dead holders' locks released, then its kind's own
    repairs, then dead processes out of its attach slots and, if no live one is left, the
    segment unlinked (after its kind's last step before that)."""
    try:
        attached = L.attached_processes(core.words)
        released = _release_dead_locks(core, attached, liveness, repairs)
        steps.repair(core, released, liveness, repairs)
        sender_deaths = L.SENDER_DEATHS if isinstance(core, FeedCore) else None
        if _drop_dead_attachers(core, attached, liveness, sender_deaths):
            steps.before_destroy(core)
            _destroy(core, repairs)
    finally:
        core.release()


def _release_dead_locks(
    core: AttachedSegment, attached: list[tuple[int, int]], liveness: Liveness, repairs: Repairs
) -> list[int]:
    """Release each lock of the segment whose holder died; the owner words of those released."""
    released = []
    for lock_word, lock in zip(core.kind.locks, core.lock_semaphores()):
        if _release_dead_owner(core, lock_word, lock, liveness, attached, repairs):
            released.append(lock_word.owner_word)
    return released


def _release_dead_owner(
    core: AttachedSegment, lock_word: L.LockWord, lock: Any, liveness: Liveness, attached: list[tuple[int, int]],
    repairs: Repairs,
) -> bool:
    owner = int(core.words[lock_word.owner_word])
    key = (core.segment_name, lock_word.owner_word)
    if not owner:
        if lock.value != 0:
            liveness.suspects.pop(key, None)
            return False
        if key not in liveness.suspects:
            if any(not liveness.alive(*p) for p in attached):
                liveness.suspects[key] = 1
            return False
        liveness.suspects[key] += 1
        if liveness.suspects[key] < SUSPECT_CHECKS:
            return False
        del liveness.suspects[key]
        lock.release()
        repairs.released_locks.append(f"{lock_word.what} lock of {core.segment_name} taken by a process that died at once")
        return True
    liveness.suspects.pop(key, None)
    if liveness.owner_alive(owner, attached):
        return False
    if lock.value != 0:
        return False  # released after all (the owner word was being cleared)
    core.words[lock_word.owner_word] = 0
    lock.release()
    repairs.released_locks.append(f"{lock_word.what} lock of {core.segment_name} held by dead pid {owner}")
    return True


def _drop_dead_attachers(
    core: AttachedSegment, attached: list[tuple[int, int]], liveness: Liveness, sender_deaths_word: int | None = None
) -> bool:
    """Clear dead processes from the attach slots; True if the segment is now orphaned.

    An orphaned segment is marked DESTROYED (under its lock); the caller unlinks it. For a
    feed (``sender_deaths_word``), a dead sender's slot is counted there as it goes.
    """
    dead = [p for p in attached if not liveness.alive(*p)]
    if attached and not dead:
        return False
    words = core.words
    kept = core._outlives_holders()  # before the lock: it looks at other segments
    core.acquire()
    try:
        for pid, ticks in dead:
            flags = L.remove_attached(words, pid, ticks)
            if sender_deaths_word is not None and flags > 0 and flags & L.SLOT_SENDER:
                words[sender_deaths_word] += 1
        orphaned = not words[L.DESTROYED] and not kept \
            and not any(liveness.alive(*p) for p in L.attached_processes(words))
        if orphaned:
            words[L.DESTROYED] = 1
        return orphaned
    finally:
        core.release_lock()


def _destroy(core: AttachedSegment, repairs: Repairs) -> None:
    """Unlink an orphaned segment (marked DESTROYED): its locks first, the segment last."""
    locks = [_names.semaphore_path(_names.lock_semaphore(core.namespace, i)) for i in L.lock_ids(core.words, core.kind)]
    core.unlink_names()
    repairs.destroyed += [_names.shm_path(core.segment_name)] + locks


# --- channels --------------------------------------------------------------------------------


def _repair_channel(core: _ring.ChannelCore, released: list[int], liveness: Liveness, repairs: Repairs) -> None:
    """Dead waiters out of the wait lists (the rest woken after a death); the message count
    redone if a sender or receiver died holding its lock."""
    recount = any(word != L.WAIT_LOCK_OWNER for word in released)
    someone_died = recount or any(not liveness.alive(*p) for p in L.attached_processes(core.words))
    _drop_dead_wakers(core, liveness, wake_the_rest=someone_died)
    if recount:
        _recount(core)


def _close_channel(core: _ring.ChannelCore) -> None:
    core.close()  # wakes anyone still waiting (a process between attach steps)


def _drop_dead_wakers(core: _ring.ChannelCore, liveness: Liveness, wake_the_rest: bool) -> None:
    """Take dead processes' wakers out of the wait lists; after a death, wake the others.

    A process killed while waking waiters leaves some of them listed but not posted
    (see ``ChannelCore._wake``); waking every listed waiter costs at most one spurious
    wake-up each, and every waiter checks again.
    """
    words = core.words
    if not (words[L.RECV_WAITING] or words[L.SEND_WAITING]):
        return
    core._lock_waitlists()
    try:
        for first, count in ((L.RECV_WAITLIST_WORD, L.RECV_WAITING), (L.SEND_WAITLIST_WORD, L.SEND_WAITING)):
            for word in range(first, first + L.WAITLIST_SLOTS):
                waker_id = int(words[word])
                if waker_id and liveness.ticks(_names.waker_pid(waker_id)) is None:
                    words[word] = 0
                    words[count] = max(0, words[count] - 1)
            if wake_the_rest:
                L.waitlist_post_all(words, first, count, core.namespace)
    finally:
        core._unlock_waitlists()


def _recount(core: _ring.ChannelCore) -> None:
    """Make SENT - RECEIVED equal the records in the ring again (both locks held)."""
    core.acquire()
    own_recv = core.recv_lock is not core.send_lock
    try:
        if own_recv:
            core.recv_lock.acquire()
    except BaseException:
        core.release_lock()
        raise
    try:
        words, ring, base = core.words, core.ring_bytes, L.HEADER_BYTES
        position, end, records = int(words[L.READ_POS]), int(words[L.WRITE_POS]), 0
        while position < end and end - position <= ring:
            offset = position % ring
            size, kind = _ring.RECORD_HEADER.unpack_from(core.buffer, base + offset)
            if kind == _ring.KIND_WRAP:
                position += ring - offset
                continue
            if kind not in (_ring.KIND_DATA, _ring.KIND_SPILL):
                break
            position += 8 + ((size + 7) & ~7)
            records += 1
        words[L.SENT] = int(words[L.RECEIVED]) + records
    finally:
        if own_recv:
            core.recv_lock.release()
        core.release_lock()


# --- feeds -----------------------------------------------------------------------------------


def _repair_feed(core: FeedCore, released: list[int], liveness: Liveness, repairs: Repairs) -> None:
    """Subscriptions of dead processes ended; those of a feed whose every sender died failed."""
    _end_dead_subscriptions(core, liveness, repairs)
    _fail_if_every_sender_died(core, liveness, repairs)


def _end_dead_subscriptions(core: FeedCore, liveness: Liveness, repairs: Repairs) -> None:
    """End the subscriptions whose owner died; but a durable bridge's outbox's, which its
    successor takes over (``_outbox``)."""
    kept = _outbox.kept_subscriptions(core.words)
    for entry, sub_id, channel_id, err_id, owner in L.active_subscriptions(core.words, core.table):
        if sub_id in kept:
            continue
        if liveness.ticks(owner) is None and core.end_subscription(entry, sub_id, channel_id, err_id):
            repairs.ended_subscriptions += 1


def _fail_if_every_sender_died(core: FeedCore, liveness: Liveness, repairs: Repairs) -> None:
    """Fail the subscriptions once no live sender is left and one of the senders died.

    A sender that detached normally cleared its flag: it stopped sending and fails nobody.
    A dead sender's slot is counted in SENDER_DEATHS while others still send, so that its
    death is reported when the last of them is gone.
    """
    words = core.words
    senders = L.attached_processes(words, L.SLOT_SENDER)
    # A process clears its flag as it stops sending, which may be as it exits: only a flag
    # read after its death was known is final.
    dead = [s for s in senders if not liveness.alive(*s)]
    if dead:
        still_flagged = set(L.attached_processes(words, L.SLOT_SENDER))
        dead = [s for s in dead if s in still_flagged]
    if not dead and not words[L.SENDER_DEATHS]:
        return
    someone_sends = len(dead) < len(senders)
    if not someone_sends and not words[L.FEED_CLOSED]:
        for entry, sub_id, channel_id, err_id, _owner in L.active_subscriptions(core.words, core.table):
            error = SenderDiedError(
                f"shmfeed: every process sending on feed {core._label()} is gone and at least one "
                f"died without detaching; resubscribe once a sender is back"
            )
            if core.end_subscription(entry, sub_id, channel_id, err_id, error):
                repairs.failed_subscriptions += 1
    core.acquire()
    try:
        for pid, ticks in dead:
            L.remove_attached(words, pid, ticks)
        words[L.SENDER_DEATHS] = len(dead) + int(words[L.SENDER_DEATHS]) if someone_sends else 0
    finally:
        core.release_lock()


# --- named scopes ------------------------------------------------------------------------------


def _repair_scope(core: _SharedScope, released: list[int], liveness: Liveness, repairs: Repairs) -> None:
    """Entries and watchers' wakers of dead processes out of the scope (under its lock)."""
    words, table = core.words, core.table
    core.acquire()
    try:
        for word in range(0, L.SCOPE_SLOTS * L.SCOPE_ENTRY_WORDS, L.SCOPE_ENTRY_WORDS):
            if table[word + 3] and not liveness.alive(int(table[word]), int(table[word + 1])):
                table[word + 3] = 0
                words[L.SCOPE_COUNT] -= 1
        for word in range(L.SCOPE_WAITLIST_WORD, L.SCOPE_WAITLIST_WORD + L.WAITLIST_SLOTS):
            if words[word] and liveness.ticks(_names.waker_pid(int(words[word]))) is None:
                words[word] = 0
                words[L.SCOPE_WAITING] = max(0, words[L.SCOPE_WAITING] - 1)
        if words[L.SCOPE_CLOSED]:  # a closer may have died before waking every watcher
            L.waitlist_post_all(words, L.SCOPE_WAITLIST_WORD, L.SCOPE_WAITING, core.namespace)
    finally:
        core.release_lock()


# --- every kind ------------------------------------------------------------------------------------


class _Steps(NamedTuple):
    """What recovery does differently for one kind of segment."""

    map_unattached: Callable[[str, Entry], Any]  # the segment, its locks bounded; None if gone
    repair: Callable[[Any, list[int], Liveness, Repairs], None]  # (core, released owner words, ...)
    before_destroy: Callable[[Any], None] = lambda core: None


_SEGMENT_STEPS = {
    EntryKind.CHANNEL: _Steps(lambda namespace, entry: _ring.ChannelCore.map_unattached(namespace, entry.number),
                              _repair_channel, _close_channel),
    EntryKind.FEED: _Steps(lambda namespace, entry: FeedCore.map_unattached(namespace, entry.key), _repair_feed),
    EntryKind.SCOPE: _Steps(lambda namespace, entry: _SharedScope.map_unattached(namespace, entry.segment),
                            _repair_scope),
}
