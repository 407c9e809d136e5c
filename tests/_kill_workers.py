"""Process targets and parent-side drivers of the kill scenarios (``test_kills.py``,
``tools/killmatrix.py``).

Every scenario is a driver ``scenario_*(ctx, namespace) -> Outcome``: it runs in the
parent, starts its children with the multiprocessing context ``ctx``, SIGKILLs some of
them (or the registry) for real, checks what the survivors got, lets go of the parent's
objects and waits — polling ``_gc.namespace_entries`` with a deadline — until nothing of
the namespace is left in /dev/shm. It returns the figures the tests assert and the kill
matrix prints; checks that are not figures (order, return counts, error types) are
asserted inside the driver.

Synchronisation is by handshakes on channels (or a multiprocessing queue where the parent
must hold nothing of the namespace), never by sleeps; polling is used only by the parent,
for conditions no one can announce (a send blocked, the registry watching a pid, a
directory becoming empty).

Targets are module-level (spawn and forkserver children import this module) and take the
namespace first: a forkserver child inherits the forkserver's environment, not the test's.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import shmfeed
from shmfeed import _gc, _registry_client, _release, _segment
from shmfeed import _layout as L
from shmfeed.testing import registry_pid, running, wait_until  # noqa: F401 - drivers use K.running etc.

RECV_TIMEOUT = 60.0  # children never wait forever, whatever goes wrong in the parent
RESULT_TIMEOUT = 60.0
JOIN_TIMEOUT = 30.0
PROCEED_BOUND = 1.5  # SPEC: within 1 s of death detection; slack for a loaded 2-core box
CLEAN_BOUND = 3.0  # scenario 6: everything gone from /dev/shm within this
BIG = 1 << 20  # scenario 4: value size


# --- results ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What one scenario measured."""

    scenario: str
    proceed_s: float  # kill -> the survivors went on (scenario 6: -> /dev/shm clean)
    lost: int  # values a survivor should have got and did not
    duplicated: int  # values a survivor got more than once
    left: list[str]  # the namespace's entries in /dev/shm after cleanup
    allowed_lost: int = 0
    bound_s: float = PROCEED_BOUND
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def violations(self) -> list[str]:
        found = []
        if not self.proceed_s < self.bound_s:
            found.append(f"took {self.proceed_s * 1000:.0f} ms (bound {self.bound_s * 1000:.0f} ms)")
        if self.lost > self.allowed_lost:
            found.append(f"{self.lost} value(s) lost (at most {self.allowed_lost} allowed)")
        if self.duplicated:
            found.append(f"{self.duplicated} value(s) duplicated")
        if self.left:
            found.append(f"left in /dev/shm: {self.left}")
        return found


def lost_and_duplicated(expected: list[Any], got: list[Any]) -> tuple[set[Any], int]:
    counts = collections.Counter(got)
    return set(expected) - set(counts), sum(c - 1 for c in counts.values() if c > 1)


# --- helpers for targets ------------------------------------------------------------------------------


from _workers import enter_namespace, reporting  # noqa: E402 - shared with the other targets


# --- helpers for drivers ---------------------------------------------------------------------------------


class ChildFailed(AssertionError):
    pass


def get(results: shmfeed.Channel, timeout: float = RESULT_TIMEOUT) -> Any:
    """The next report of a child; a child's error report raises with its traceback."""
    message = results.recv(timeout=timeout)
    if isinstance(message, tuple) and message and message[0] == "error":
        raise ChildFailed(f"child {message[1]} failed:\n{message[2]}")
    return message


def premise(ok: object, what: str) -> None:
    """A broken premise of a test is a plain failure, not the one the test looks for."""
    if not ok:
        raise RuntimeError(f"premise of the test broken: {what}")


def wait_watched(namespace: str, *pids: int, timeout: float = 30.0) -> None:
    """Until the registry watches every pid (its pidfd is open): a death is then seen at once."""

    def watched() -> bool:
        try:
            answer = _registry_client.request(namespace, {"op": "snapshot"}, timeout=2.0)
        except shmfeed.RegistryUnavailableError:
            return False
        return set(pids) <= set(answer.get("watched", ()))

    wait_until(watched, timeout, f"the registry watching {pids}")


def kill(*pids: int) -> float:
    """SIGKILL every pid; the time of the (last) kill."""
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def cleanup(namespace: str, timeout: float = 10.0) -> list[str]:
    """Let go of this process's objects of ``namespace`` and wait (polling) until the
    namespace has nothing left in /dev/shm; the entries still there at the deadline."""
    import gc

    gc.collect()
    _release.release_namespace(namespace)
    deadline = time.monotonic() + timeout
    while True:
        left = _gc.namespace_entries(namespace)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.01)


class SenderThread(threading.Thread):
    """Sends ``values`` (on a feed or a channel) and records what each send returned and when."""

    def __init__(self, send: Callable[[Any], Any], values: list[Any]) -> None:
        super().__init__(daemon=True)
        self.send = send
        self.values = values
        self.returns: list[Any] = []
        self.times: list[float] = []
        self.error: BaseException | None = None
        self.sent = 0  # values whose send returned

    def run(self) -> None:
        try:
            for value in self.values:
                self.returns.append(self.send(value))
                self.times.append(time.monotonic())
                self.sent += 1
        except BaseException as error:  # noqa: BLE001 - reported by finish()
            self.error = error

    def finish(self, timeout: float = RESULT_TIMEOUT) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the sending thread is still blocked"
        if self.error is not None:
            raise self.error


# =====================================================================================================
# Targets
# =====================================================================================================


@reporting
def stuck_subscriber(results: shmfeed.Channel, feed_name: str) -> None:
    """Subscribe an own channel of capacity 1 to the feed, hand it to the parent, never read."""
    feed = shmfeed.Feed(feed_name)
    channel = shmfeed.Channel(capacity=1)
    feed.subscribe(channel)
    results.send(("ready", "stuck", os.getpid(), channel))
    time.sleep(RECV_TIMEOUT)  # until killed


@reporting
def reading_subscriber(results: shmfeed.Channel, feed_name: str) -> None:
    """Subscribe an own channel to the feed, read until -1, report everything read."""
    feed = shmfeed.Feed(feed_name)
    channel = shmfeed.Channel(capacity=1024)
    sub = feed.subscribe(channel)
    results.send(("ready", "reader", os.getpid(), None))
    values = []
    while (value := channel.recv(timeout=RECV_TIMEOUT)) != -1:
        values.append(value)
    sub.unsubscribe()
    results.send(("got", os.getpid(), values))


@reporting
def queue_forwarder(results: shmfeed.Channel, index: int, queue: shmfeed.Channel) -> None:
    """Take values from a shared work queue; forward each at once as ``(index, value)``."""
    results.send(("ready", index, os.getpid()))
    for value in queue:  # until closed and drained
        results.send((index, value), timeout=RECV_TIMEOUT)
    results.send(("done", index, os.getpid()))


@reporting
def blocked_feed_sender(results: shmfeed.Channel, feed_name: str, values: list[Any]) -> None:
    """Send ``values`` on the feed (the last one blocks on a full channel until killed)."""
    feed = shmfeed.Feed(feed_name)
    results.send(("ready", os.getpid()))
    for value in values:
        feed.send(value)
    results.send(("sent-all", os.getpid()))  # not reached: the parent kills us first


def big_value(seq: int, size: int = BIG) -> bytes:
    """``size`` bytes: the 8-byte little-endian seq, then the seq's low byte repeated."""
    return seq.to_bytes(8, "little") + bytes([seq & 0xFF]) * (size - 8)


def check_big_value(value: Any, size: int = BIG) -> int:
    """The seq of a ``big_value``; AssertionError if it is incomplete or inconsistent."""
    assert type(value) is bytes, f"got a {type(value).__name__}"
    assert len(value) == size, f"a value of {len(value)} bytes, not {size}"
    seq = int.from_bytes(value[:8], "little")
    fill = seq & 0xFF
    assert value.count(fill, 8) == size - 8, f"value {seq} has bytes other than {fill}"
    return seq


@reporting
def big_sender(results: shmfeed.Channel, channel: shmfeed.Channel, first: int, count: int | None) -> None:
    """Send ``big_value(first)``, ``big_value(first + 1)``, ... (forever if ``count`` is None)."""
    results.send(("ready", os.getpid()))
    seq = first
    while count is None or seq < first + count:
        channel.send(big_value(seq), timeout=RECV_TIMEOUT)
        seq += 1
    results.send(("sent", os.getpid(), seq))


@reporting
def stream_sender(results: shmfeed.Channel, feed_name: str, go: shmfeed.Channel, n: int) -> None:
    feed = shmfeed.Feed(feed_name)
    results.send(("ready", "sender", os.getpid()))
    go.recv(timeout=RECV_TIMEOUT)
    counts = collections.Counter(feed.send(i) for i in range(n))
    results.send(("sent", os.getpid(), dict(counts)))


@reporting
def stream_receiver(results: shmfeed.Channel, feed_name: str, n: int, every: int) -> None:
    feed = shmfeed.Feed(feed_name)
    channel = shmfeed.Channel(capacity=1024)
    sub = feed.subscribe(channel)
    results.send(("ready", "receiver", os.getpid()))
    values = []
    for count in range(1, n + 1):
        values.append(channel.recv(timeout=RECV_TIMEOUT))
        if count % every == 0:
            results.send(("progress", count))
    sub.unsubscribe()
    lost, duplicated = lost_and_duplicated(list(range(n)), values)
    results.send(("got", len(values), values == list(range(n)), len(lost), duplicated))


@reporting
def destroy_then_stall(results: shmfeed.Channel) -> None:
    """Be the last process of an own channel and let go of it, stalling (until killed)
    where its semaphores are already unlinked but its segment is not yet."""
    from shmfeed import _layout as L
    from shmfeed import _names, _shm

    channel = shmfeed.Channel()
    core = channel._core  # type: ignore[attr-defined]
    locks = [os.path.basename(_names.semaphore_path(_names.lock_semaphore(core.namespace, int(core.words[word]))))
             for word in (L.LOCK_ID, L.RECV_LOCK_ID, L.WAIT_LOCK_ID)]

    def stall(name: str) -> None:
        results.send(("unlinking", os.getpid(), core.segment_name, locks, name))
        time.sleep(RECV_TIMEOUT)

    _shm.unlink_segment = stall  # type: ignore[assignment]
    core.release()


def take_wakers_then_stall(namespace: str, channel: shmfeed.Channel, ready: Any, go: Any, stalled: Any) -> None:
    """Receive one value from a full channel a send waits on; stall (until killed) while
    waking the waiting sender, before its waker is posted."""
    enter_namespace(namespace)
    from shmfeed import _waker

    ready.set()
    assert go.wait(RECV_TIMEOUT)

    def stall(*_: Any) -> None:
        stalled.set()
        time.sleep(RECV_TIMEOUT)

    _waker.post = stall  # type: ignore[assignment]
    # The Python wait-list code, where the stall can be put (the C path, _accel.c, does
    # the same steps in the same order).
    channel._live_core()._fast = None
    channel.recv(timeout=RECV_TIMEOUT)


def hold_channel_lock(namespace: str, channel: shmfeed.Channel, with_owner: bool, ready: Any) -> None:
    """Take the channel's send lock as the library does (``with_owner``: writing LOCK_OWNER;
    else as if killed before writing it), say so on the ``ready`` pipe, wait to be killed."""
    enter_namespace(namespace)
    core = channel._core  # type: ignore[attr-defined]
    if with_owner:
        core.acquire()
    else:
        core.send_lock.acquire()
    ready.send(os.getpid())
    signal.pause()


def hold_channel_lock_unattached(namespace: str, segment_name: str, ready: Any) -> None:
    """Take a channel's send lock with the owner word written, never having been in its
    attach slots (as a daemon thread that left them holds it when its process exits), say so
    on the ``ready`` pipe, wait to be killed."""
    enter_namespace(namespace)
    _release.release_namespace(namespace)  # a forked child leaves the slot it inherited
    opened = _segment.open_named(namespace, segment_name, L.CHANNEL_KIND)
    premise(opened is not None, "the channel exists")
    mapping, locks = opened  # type: ignore[misc]
    words = memoryview(mapping)[: L.HEADER_BYTES].cast("Q")
    locks[0].acquire()
    words[L.LOCK_OWNER] = os.getpid()
    ready.send(os.getpid())
    signal.pause()


def leave_segments(namespace: str, ready: Any) -> None:
    """Make a channel, a named feed subscribed to it and a named scope tracking that, say so
    on the ``ready`` pipe and wait to be killed: the segments outlive every process that used
    them (the test runs no registry meanwhile)."""
    enter_namespace(namespace)
    channel = shmfeed.Channel()
    scope = shmfeed.SubscriptionScope("left")
    scope.track(shmfeed.Feed("left").subscribe(channel))
    ready.send(os.getpid())
    signal.pause()


def loose_subscriber(namespace: str, reports: Any, feed_name: str, report_after: int) -> None:
    """Open the feed by name, subscribe an own channel, read forever (until killed)."""
    enter_namespace(namespace)
    feed = shmfeed.Feed(feed_name)
    channel = shmfeed.Channel(capacity=64)
    feed.subscribe(channel)
    reports.put(("ready", os.getpid()))
    count = 0
    while True:
        channel.recv(timeout=RECV_TIMEOUT)
        count += 1
        if count == report_after:
            reports.put(("reading", os.getpid()))


def loose_sender(namespace: str, reports: Any, feed_name: str) -> None:
    """Open the feed by name and send on it forever (until killed)."""
    enter_namespace(namespace)
    feed = shmfeed.Feed(feed_name)
    reports.put(("ready", os.getpid()))
    seq = 0
    while True:
        feed.send(seq)
        seq += 1


# =====================================================================================================
# Drivers (run in the parent)
# =====================================================================================================


def _subscriber_killed_while_send_waits(ctx: Any, namespace: str, feed_name: str, n: int = 200) -> dict[str, Any]:
    """Scenario 1's body (also run by scenario 5 against a replacement registry)."""
    feed = shmfeed.Feed(feed_name)
    results = shmfeed.Channel(capacity=64)
    registry_pid(namespace)
    values = list(range(n)) + [-1]
    with running(ctx, (stuck_subscriber, (namespace, results, feed_name)),
                 (reading_subscriber, (namespace, results, feed_name))) as (stuck, reader):
        ready = {m[1]: m for m in (get(results), get(results))}
        stuck_channel: shmfeed.Channel = ready["stuck"][3]
        wait_watched(namespace, stuck.pid, reader.pid)
        sender = SenderThread(feed.send, values)
        sender.start()
        # Value 0 fills the stuck channel (capacity 1); the send of value 1 waits on it.
        wait_until(lambda: stuck_channel.statistics().waiting_senders == 1 or sender.error,
                   what="a send waiting on the stuck channel")
        assert sender.sent == 1 and sender.error is None, (sender.sent, sender.error)
        killed_at = kill(stuck.pid)
        sender.finish()
        got = get(results)
        assert got[0] == "got", got
    assert stuck.exitcode == -signal.SIGKILL and reader.exitcode == 0, (stuck.exitcode, reader.exitcode)
    # The blocked send returned once the stuck subscriber's subscription was ended.
    assert sender.returns[0] == 2, sender.returns[:3]
    assert sender.returns[1:] == [1] * n, "after the kill every send reaches the reader only"
    assert got[2] == values[:-1], "the reader got every value, in order, once"
    lost, duplicated = lost_and_duplicated(values[:-1], got[2])
    del stuck_channel, ready
    return {"proceed_s": sender.times[1] - killed_at, "lost": len(lost), "duplicated": duplicated}


def scenario_subscriber_killed_while_send_waits(ctx: Any, namespace: str) -> Outcome:
    """1. A subscriber whose full channel a send waits on is killed: the send returns."""
    figures = _subscriber_killed_while_send_waits(ctx, namespace, "k")
    return Outcome("1 subscriber killed, send waiting on it", figures["proceed_s"], figures["lost"],
                   figures["duplicated"], cleanup(namespace))


def scenario_receiver_killed_mid_recv(ctx: Any, namespace: str, n: int = 20_000, kill_after: int = 5_000,
                                      window: int = 32) -> Outcome:
    """2. One of two receivers sharing a work queue is killed mid-stream; the other goes on.

    No process ever sleeps where the victim would have to wake it: the sender here keeps at
    most ``window`` values in flight (the queue holds twice that, so no send waits) and this
    process polls the results instead of sleeping on them. (A process killed while waking
    waiters once left them asleep; that is fixed, and covered on its own by
    test_killed_between_taking_and_posting_wakers in test_kills.py.)
    """
    queue = shmfeed.Channel(capacity=2 * window)
    results = shmfeed.Channel(capacity=4096)
    registry_pid(namespace)
    forwarded: list[tuple[int, int, float]] = []  # (receiver index, value, arrival time)
    progress = threading.Condition()

    def paced_send(value: int) -> None:
        with progress:
            progress.wait_for(lambda: value - len(forwarded) < window, RESULT_TIMEOUT)
        queue.send(value, timeout=RESULT_TIMEOUT)

    with running(ctx, *[(queue_forwarder, (namespace, results, i, queue)) for i in (0, 1)]) as processes:
        ready = sorted(get(results) for _ in range(2))
        assert [m[:2] for m in ready] == [("ready", 0), ("ready", 1)], ready
        wait_watched(namespace, *(p.pid for p in processes))
        victim, survivor = processes
        sender = SenderThread(paced_send, list(range(n)))
        sender.start()
        killed_at = mark = None
        deadline = time.monotonic() + RESULT_TIMEOUT
        while True:
            try:
                message = get(results, timeout=0)
            except TimeoutError:
                assert time.monotonic() < deadline, "no report from the receivers"
                time.sleep(0.0005)
                continue
            deadline = time.monotonic() + RESULT_TIMEOUT
            if message[0] == "done":
                assert message[1] == 1, message
                break
            with progress:
                forwarded.append((message[0], message[1], time.monotonic()))
                progress.notify()
            if killed_at is None and len(forwarded) >= kill_after:
                killed_at = kill(victim.pid)
                mark = sender.sent  # every value above mark was sent after the kill
                # Close the queue once everything is sent: the survivor drains it, then says done.
                threading.Thread(target=lambda: (sender.finish(), queue.close()), daemon=True).start()
        sender.finish()
    assert killed_at is not None and mark is not None
    assert victim.exitcode == -signal.SIGKILL and survivor.exitcode == 0, (victim.exitcode, survivor.exitcode)
    values = [value for _, value, _ in forwarded]
    lost, duplicated = lost_and_duplicated(list(range(n)), values)
    assert all(value <= mark for value in lost), f"values sent after the kill were lost: {sorted(lost)}"
    after = [t for index, value, t in forwarded if index == 1 and value > mark]
    assert after, "the survivor forwarded nothing sent after the kill"
    taken_by_victim = sum(1 for index, _, _ in forwarded if index == 0)
    del queue, results
    return Outcome("2 receiver killed mid-recv (work queue)", after[0] - killed_at, len(lost), duplicated,
                   cleanup(namespace), allowed_lost=1,
                   notes={"victim_forwarded": taken_by_victim, "sent_at_kill": mark})


def scenario_sender_killed_holding_send_lock(ctx: Any, namespace: str) -> Outcome:
    """3. A sender blocked inside ``Feed.send`` (holding the feed's send lock) is killed;
    another sender remains (this process), so the subscription is not failed."""
    feed = shmfeed.Feed("k")
    channel = shmfeed.Channel(capacity=1)
    sub = feed.subscribe(channel)
    results = shmfeed.Channel(capacity=64)
    registry_pid(namespace)
    assert feed.send("p0") == 1  # this process is a sender too; the channel is now full
    with running(ctx, (blocked_feed_sender, (namespace, results, "k", ["c0"]))) as (child,):
        assert get(results) == ("ready", child.pid)
        wait_watched(namespace, child.pid)
        wait_until(lambda: channel.statistics().waiting_senders == 1, what="the child's send waiting")
        killed_at = kill(child.pid)
        got = [channel.recv(timeout=5)]  # room again; the feed's send lock is the dead child's
        sender = SenderThread(feed.send, ["p1"])
        sender.start()
        sender.finish()
        proceed = sender.times[0] - killed_at
        got.append(channel.recv(timeout=5))
    assert child.exitcode == -signal.SIGKILL, child.exitcode
    assert sender.returns == [1]
    assert got == ["p0", "p1"], got
    try:
        error = sub.err().recv(timeout=0.5)
    except TimeoutError:
        pass  # still running: a live sender (this process) remains
    else:
        raise AssertionError(f"the subscription ended ({error!r}) though a live sender remains")
    lost, duplicated = lost_and_duplicated(["p0", "p1"], got)
    sub.unsubscribe()
    del feed, channel, sub, results
    return Outcome("3 sender killed holding the feed's send lock", proceed, len(lost), duplicated,
                   cleanup(namespace))


def scenario_only_sender_killed(ctx: Any, namespace: str) -> Outcome:
    """3b. The feed's only sender is killed (blocked in send): the subscription fails with
    SenderDiedError; what it delivered stays readable."""
    feed = shmfeed.Feed("k")
    channel = shmfeed.Channel(capacity=1)
    sub = feed.subscribe(channel)
    results = shmfeed.Channel(capacity=64)
    registry_pid(namespace)
    with running(ctx, (blocked_feed_sender, (namespace, results, "k", ["c0", "c1"]))) as (child,):
        assert get(results) == ("ready", child.pid)
        wait_watched(namespace, child.pid)
        wait_until(lambda: channel.statistics().waiting_senders == 1, what="the child's second send waiting")
        killed_at = kill(child.pid)
        error = sub.err().recv(timeout=3)
        proceed = time.monotonic() - killed_at
    assert child.exitcode == -signal.SIGKILL, child.exitcode
    assert isinstance(error, shmfeed.SenderDiedError), repr(error)
    got = [channel.recv(timeout=5)]
    try:
        got.append(channel.recv(timeout=0))
    except TimeoutError:
        pass
    assert got == ["c0"], got  # "c1" was never delivered: its send did not return
    lost, duplicated = lost_and_duplicated(["c0"], got)
    del feed, channel, sub, results
    return Outcome("3b only sender killed -> SenderDiedError", proceed, len(lost), duplicated, cleanup(namespace))


def scenario_sender_killed_mid_write(ctx: Any, namespace: str, before_kill: int = 20) -> Outcome:
    """4. A sender streaming 1 MiB values (inline in a 16 MiB ring) is killed, if it can be
    caught so, while it holds the channel's send lock (mid-write)."""
    from shmfeed import _layout as L

    channel = shmfeed.Channel(buffer_size=16 << 20)
    results = shmfeed.Channel(capacity=64)
    registry_pid(namespace)
    seqs: list[int] = []
    with running(ctx, (big_sender, (namespace, results, channel, 0, None))) as (child,):
        assert get(results) == ("ready", child.pid)
        wait_watched(namespace, child.pid)
        for _ in range(before_kill):
            seqs.append(check_big_value(channel.recv(timeout=RESULT_TIMEOUT)))
        # Kill while the child holds the channel's send lock (it is writing a record), if it
        # can be caught so within a few seconds: take one value (making room, so the child
        # writes again), then watch the lock's owner word for a moment.
        words = channel._core.words  # type: ignore[attr-defined]
        deadline = time.monotonic() + 5.0
        held_lock, taken = False, []
        while not held_lock and time.monotonic() < deadline:
            taken.append(channel.recv(timeout=RESULT_TIMEOUT))
            watch_until = time.monotonic() + 0.05
            while not (held_lock := words[L.LOCK_OWNER] == child.pid) and time.monotonic() < watch_until:
                pass
        killed_at = kill(child.pid)
        seqs += [check_big_value(value) for value in taken]
        del taken
        child.join(JOIN_TIMEOUT)
        # Drain what was committed: every value whole, none twice, none skipped. Not with
        # timeout=0: the registry's repair holds the receive lock for a moment (it recounts
        # the ring), and a poll that meets the lock held says "nothing" as for an empty ring.
        while True:
            try:
                seqs.append(check_big_value(channel.recv(timeout=0.5)))
            except TimeoutError:
                break
        # The channel is not wedged: a send from here completes (the dead writer's lock freed).
        channel.send(b"probe", timeout=5)
        proceed = time.monotonic() - killed_at
        assert channel.recv(timeout=5) == b"probe"
    assert child.exitcode == -signal.SIGKILL, child.exitcode
    assert seqs == list(range(len(seqs))), "values whole, in order, none lost or twice"
    # A new sender process sends on the same channel; its value arrives whole.
    with running(ctx, (big_sender, (namespace, results, channel, len(seqs), 1))) as (second,):
        assert get(results) == ("ready", second.pid)
        assert check_big_value(channel.recv(timeout=RESULT_TIMEOUT)) == len(seqs)
        assert get(results) == ("sent", second.pid, len(seqs) + 1)
    assert second.exitcode == 0
    stats = channel.statistics()
    assert stats.fill == 0 and stats.sent == stats.received == len(seqs) + 2, stats
    lost, duplicated = lost_and_duplicated(list(range(len(seqs))), seqs)
    del channel, results, words
    return Outcome("4 sender killed mid-write of 1 MiB", proceed, len(lost), duplicated, cleanup(namespace),
                   notes={"held_send_lock_at_kill": held_lock, "values": len(seqs)})


def scenario_registry_killed(ctx: Any, namespace: str, n: int = 30_000, every: int = 1_000,
                             kill_at: int = 5_000) -> Outcome:
    """5. The registry is killed during steady feed traffic: the traffic completes in order;
    the next control operation starts a new registry, which still recovers a killed subscriber."""
    results = shmfeed.Channel(capacity=1024)
    go = shmfeed.Channel(capacity=1)
    # Created here first, only to read its figures (two children creating the same named
    # feed at once is covered by test_concurrent_creation_of_a_named_feed).
    feed = shmfeed.Feed("s")
    old_pid = registry_pid(namespace)
    with running(ctx, (stream_receiver, (namespace, results, "s", n, every)),
                 (stream_sender, (namespace, results, "s", go, n))) as (receiver, sender):
        assert sorted(get(results)[:2] for _ in range(2)) == [("ready", "receiver"), ("ready", "sender")]
        go.send("go")
        killed_at = None
        progress_after_kill = None
        reports: dict[str, Any] = {}
        while len(reports) < 2:
            message = get(results)
            if message[0] == "progress":
                if killed_at is None and message[1] >= kill_at:
                    killed_at = kill(old_pid)
                    sent_at_kill = feed.statistics().sent
                elif killed_at is not None and progress_after_kill is None:
                    progress_after_kill = time.monotonic()
            else:
                reports[message[0]] = message
    assert receiver.exitcode == 0 and sender.exitcode == 0, (receiver.exitcode, sender.exitcode)
    assert killed_at is not None and progress_after_kill is not None
    assert sent_at_kill < n, "the registry was killed only after the traffic ended"
    _, count, in_order, lost, duplicated = reports["got"]
    assert count == n and in_order, reports["got"]
    assert reports["sent"][2] == {1: n}, reports["sent"]
    # The next use starts a new registry.
    wait_until(lambda: not _registry_client.is_running(namespace), 10, "the killed registry's lock released")
    probe = shmfeed.Channel()
    new_pid = registry_pid(namespace, not_pid=old_pid)
    assert _registry_client.is_running(namespace)
    # ... and it does its job.
    again = _subscriber_killed_while_send_waits(ctx, namespace, "k2")
    del feed, results, go, probe
    return Outcome("5 registry killed during traffic", max(progress_after_kill - killed_at, again["proceed_s"]),
                   lost + again["lost"], duplicated + again["duplicated"], cleanup(namespace),
                   notes={"traffic_after_kill_s": progress_after_kill - killed_at, "sent_at_kill": sent_at_kill,
                          "new_registry_recovery_s": again["proceed_s"], "old_pid": old_pid, "new_pid": new_pid})


def scenario_all_killed(ctx: Any, namespace: str, use_gc: bool = False) -> Outcome:
    """6. Sender and both subscribers (which made every object) are killed at once while this
    process holds nothing of the namespace; the registry (or, with ``use_gc``, ``shmfeed gc``
    after the registry was killed as well) leaves nothing in /dev/shm."""
    assert not _gc.namespace_entries(namespace), "the parent must hold nothing of the namespace"
    reports = ctx.Queue()
    specs = [(loose_subscriber, (namespace, reports, "k", 500)) for _ in range(2)]
    specs.append((loose_sender, (namespace, reports, "k")))
    # One after the other, so that the reports come in a known order.
    with running(ctx, specs[0]) as (first,):
        assert reports.get(timeout=RESULT_TIMEOUT) == ("ready", first.pid)
        with running(ctx, specs[1]) as (second,):
            assert reports.get(timeout=RESULT_TIMEOUT) == ("ready", second.pid)
            subscribers = [first, second]
            with running(ctx, specs[2]) as (sender,):
                # Each process's queue feeder thread flushes on its own: compare as sets.
                expected = {("ready", sender.pid)} | {("reading", p.pid) for p in subscribers}
                assert {reports.get(timeout=RESULT_TIMEOUT) for _ in range(3)} == expected
                pids = [sender.pid] + [p.pid for p in subscribers]
                registry = registry_pid(namespace)
                wait_watched(namespace, *pids)
                # The registry (6b) first, so that gc, not the registry, does the cleanup.
                killed_at = kill(*(([registry] if use_gc else []) + pids))
                for process in [*subscribers, sender]:
                    process.join(JOIN_TIMEOUT)
                if use_gc:
                    wait_until(lambda: not _registry_client.is_running(namespace), 10, "the registry gone")
                    result = subprocess.run([sys.executable, "-m", "shmfeed._cli", "gc", "--namespace", namespace],
                                            capture_output=True, text=True, timeout=60)
                    assert result.returncode == 0, result.stderr
                deadline = time.monotonic() + CLEAN_BOUND + 2
                while _gc.namespace_entries(namespace) and time.monotonic() < deadline:
                    time.sleep(0.005)
                cleaned = time.monotonic() - killed_at
    assert [p.exitcode for p in [*subscribers, sender]] == [-signal.SIGKILL] * 3
    reports.close()
    reports.join_thread()
    if use_gc:
        _registry_client.forget_dead_registry(namespace)
    label = "6b all killed + registry, shmfeed gc" if use_gc else "6 all parties killed"
    return Outcome(label, cleaned, 0, 0, _gc.namespace_entries(namespace), bound_s=CLEAN_BOUND)


SCENARIOS: list[Callable[[Any, str], Outcome]] = [
    scenario_subscriber_killed_while_send_waits,
    scenario_receiver_killed_mid_recv,
    scenario_sender_killed_holding_send_lock,
    scenario_only_sender_killed,
    scenario_sender_killed_mid_write,
    scenario_registry_killed,
    scenario_all_killed,
    functools.partial(scenario_all_killed, use_gc=True),
]
