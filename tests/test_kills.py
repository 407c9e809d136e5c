"""Processes killed with SIGKILL (SPEC §3, §5): the registry recovers, survivors go on.

Each scenario's driver lives in ``_kill_workers`` (so that ``tools/killmatrix.py`` runs the
very same code); it kills for real with ``os.kill(pid, SIGKILL)``, synchronises by
handshakes, checks what the survivors got and waits until the namespace is clean. Here
every test asserts the figures: the survivors went on within ``PROCEED_BOUND`` of the kill
(SPEC: within 1 s of death detection; slack for a loaded 2-core box), no value lost or
duplicated among survivors, nothing of the namespace left in /dev/shm.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

import _kill_workers as K
import shmfeed
from shmfeed import _gc, _registry_client


def _assert_outcome(outcome: K.Outcome) -> None:
    assert outcome.proceed_s < outcome.bound_s, outcome
    assert outcome.lost <= outcome.allowed_lost, outcome
    assert outcome.duplicated == 0, outcome
    assert outcome.left == [], outcome
    assert not outcome.violations(), outcome


# --- 1. subscriber killed while a send waits on its full channel ---------------------------------


@pytest.mark.timeout(90)
def test_subscriber_killed_while_send_waits_on_it(mp_context, namespace):
    outcome = K.scenario_subscriber_killed_while_send_waits(mp_context, namespace)
    _assert_outcome(outcome)
    assert outcome.lost == 0


# --- 2. one of two work-queue receivers killed mid-recv ----------------------------------------------


@pytest.mark.timeout(120)
def test_receiver_killed_mid_recv(mp_context, namespace):
    outcome = K.scenario_receiver_killed_mid_recv(mp_context, namespace)
    _assert_outcome(outcome)
    assert outcome.lost <= 1  # the value the victim took but had not forwarded


# --- 3. sender killed holding the feed's send lock ------------------------------------------------------


@pytest.mark.timeout(90)
def test_sender_killed_holding_feed_send_lock(mp_context, namespace):
    outcome = K.scenario_sender_killed_holding_send_lock(mp_context, namespace)
    _assert_outcome(outcome)
    assert outcome.lost == 0


@pytest.mark.timeout(90)
def test_only_sender_killed_fails_subscription(mp_context, namespace):
    outcome = K.scenario_only_sender_killed(mp_context, namespace)
    _assert_outcome(outcome)
    assert outcome.lost == 0


# --- 4. sender killed mid-write of a 1 MiB value ------------------------------------------------------------


@pytest.mark.timeout(120)
def test_sender_killed_mid_write_of_large_value(mp_context, namespace):
    outcome = K.scenario_sender_killed_mid_write(mp_context, namespace)
    _assert_outcome(outcome)
    assert outcome.lost == 0


# --- 5. registry killed during steady traffic ------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_registry_killed_during_traffic(mp_context, namespace):
    outcome = K.scenario_registry_killed(mp_context, namespace)
    _assert_outcome(outcome)
    assert outcome.lost == 0
    assert outcome.notes["new_pid"] != outcome.notes["old_pid"]


# --- 6. every party killed at once ----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_all_parties_killed_registry_cleans_up(mp_context, namespace):
    outcome = K.scenario_all_killed(mp_context, namespace)
    _assert_outcome(outcome)


@pytest.mark.timeout(90)
def test_all_parties_and_registry_killed_gc_cleans_up(mp_context, namespace):
    outcome = K.scenario_all_killed(mp_context, namespace, use_gc=True)
    _assert_outcome(outcome)


# --- 7. fifty processes start using a fresh namespace at once: one registry ----------------------------------------

_CREATE_AT_ONCE = """
import sys
import shmfeed
print("ready", flush=True)
sys.stdin.readline()
channel = shmfeed.Channel()
print("made", flush=True)
sys.stdin.readline()
"""


def _registries(namespace: str) -> list[int]:
    """Live (non-zombie) registry processes of ``namespace``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any("shmfeed._registry" in part for part in cmdline) and namespace in cmdline:
            found.append(process.pid)
    return found


@pytest.mark.timeout(60)
def test_fifty_processes_start_one_registry(namespace):
    count = 50
    env = dict(os.environ)
    children = [
        subprocess.Popen([sys.executable, "-c", _CREATE_AT_ONCE], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    try:
        assert [child.stdout.readline().strip() for child in children] == ["ready"] * count
        assert not _registry_client.is_running(namespace) and _registries(namespace) == []
        for child in children:  # the barrier: every child is waiting on its stdin
            child.stdin.write("go\n")
        for child in children:
            child.stdin.flush()
        assert [child.stdout.readline().strip() for child in children] == ["made"] * count
        pid = K.registry_pid(namespace)
        # A registry that lost the race exits at once; after that exactly one stays.
        deadline = time.monotonic() + 10
        while (found := _registries(namespace)) != [pid] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert found == [pid]
        assert K.registry_pid(namespace) == pid
        for child in children:
            child.stdin.write("bye\n")
            child.stdin.flush()
        assert [child.wait(30) for child in children] == [0] * count
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
            child.stdin.close()
            child.stdout.close()
    K.wait_until(lambda: not _gc.namespace_entries(namespace), 10, "the namespace empty")
    K.wait_until(lambda: not _registry_client.is_running(namespace), 10, "the idle registry gone")


# --- regressions: library bugs found while writing these tests (fixed) ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_concurrent_creation_of_a_named_feed(namespace, monkeypatch):
    """Two processes doing ``Feed("race")`` at once: both must get the same feed.

    The interleaving is forced: this process's open attempt misses (as if it ran just before
    the other process published the segment), then its create finds the name taken. Seen
    for real in scenario 5 with a sender and a receiver process opening ``Feed("s")``
    together under forkserver.
    """
    from shmfeed._feed import FeedCore

    winner = shmfeed.Feed("race")  # the other process, which published first
    original = FeedCore._open.__func__
    missed = []

    def open_misses_once(cls, *args):
        if not missed:
            missed.append(True)
            return None
        return original(cls, *args)

    monkeypatch.setattr(FeedCore, "_open", classmethod(open_misses_once))
    loser = shmfeed.Feed("race")
    channel = shmfeed.Channel()
    sub = winner.subscribe(channel)
    assert loser.send("same feed") == 1 and channel.recv(timeout=5) == "same feed"
    sub.unsubscribe()


@pytest.mark.timeout(60)
def test_killed_while_destroying_a_channel(namespace):
    """A process killed while destroying the last channel it used leaves nothing behind.

    The kill lands, forced by a stall in ``_shm.unlink_segment``, between the two steps
    of ``unlink_names`` (semaphores first, then the segment, which names what is left). Met for real in scenario 6, where the sender drops a killed
    subscriber's channel and is the last to detach from it.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    results = shmfeed.Channel()
    locks: set[str] = set()
    segment = ""
    try:
        with K.running(ctx, (K.destroy_then_stall, (namespace, results))) as (child,):
            message = K.get(results)
            K.premise(message[:2] == ("unlinking", child.pid), f"the child stalls: {message}")
            segment, locks = message[2].lstrip("/"), set(message[3])
            entries = set(_gc.namespace_entries(namespace))
            K.premise(len(locks) == 3 and not locks & entries and segment in entries,
                     "the three semaphores are unlinked, the segment not yet")
            K.wait_watched(namespace, child.pid)
            K.kill(child.pid)
        subprocess.run([sys.executable, "-m", "shmfeed._cli", "gc", "--namespace", namespace],
                       capture_output=True, text=True, timeout=60, check=True)
        left = K.cleanup(namespace, timeout=3.0)
        assert left == [], f"the dead process's leftovers are still there: {left}"
    finally:
        for entry in set(_gc.namespace_entries(namespace)) & (locks | {segment}):  # else the fixture fails too
            os.unlink(f"/dev/shm/{entry}")


@pytest.mark.timeout(60)
def test_killed_between_taking_and_posting_wakers(namespace):
    """A receiver killed while waking the waiting sender: the send goes on.

    The kill lands, forced by a stall in ``_waker.post``, where a receiver has freed a
    slot and is waking the sender, before the post. The waker is still listed (wakers are
    posted before the list is cleared), so recovery wakes it. Met for real in scenario 2
    (about one run in a hundred) before it was made to avoid sleeping senders.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    channel = shmfeed.Channel(capacity=1)
    channel.send("a")  # full
    ready, go, stalled = ctx.Event(), ctx.Event(), ctx.Event()
    sender = K.SenderThread(lambda v: channel.send(v, timeout=5), ["b"])
    with K.running(ctx, (K.take_wakers_then_stall, (namespace, channel, ready, go, stalled))) as (child,):
        K.premise(ready.wait(30), "the child ready")
        sender.start()
        deadline = time.monotonic() + 30
        while channel.statistics().waiting_senders != 1 and time.monotonic() < deadline:
            time.sleep(0.002)
        K.premise(channel.statistics().waiting_senders == 1, "the send waiting")
        K.wait_watched(namespace, child.pid)
        go.set()
        K.premise(stalled.wait(30), "the child stalls in _waker.post")
        K.premise(channel.statistics().waiting_senders == 1, "the waker still listed, not posted")
        K.kill(child.pid)
    sender.join(K.PROCEED_BOUND)
    try:
        assert not sender.is_alive(), "the send still sleeps although the channel has room"
    finally:
        sender.finish(10)  # its timeout (5 s) ends it: its last try finds room
        assert channel.recv(timeout=5) == "b"
