"""Soak and chaos run: a long mixed load on one namespace while processes are SIGKILLed.

    python tools/soak.py [--minutes N] [--seed S] [--json] [--namespace NS]

The namespace is ``--namespace``, else ``$SHMFEED_NAMESPACE`` if set (the tests set it),
else a fresh ``soak-<random>``. Everything runs in separate processes (multiprocessing,
forkserver start method), supervised by this one:

- ``FEEDS`` named feeds ``soak-f<k>``, each with ``SENDERS_PER_FEED`` sender processes;
- steady subscriber processes: one per feed (one of them with an 8 MiB ring, so that
  1 MiB values travel *inline* there while the 64 KiB rings of the others get them as
  *spill files*; one of them slow, with a small capacity, so that senders block on it),
  and one subscribed to every feed at once, waiting with ``select``;
- churner processes that subscribe a fresh channel to a random feed for a random short
  period, mostly through a fresh named ``SubscriptionScope``, and end it by closing the
  scope or by unsubscribing (then check that ``err()`` closes);
- a work queue: one ``Channel`` sent to by ``QUEUE_SENDERS`` processes and received from
  by ``QUEUE_RECEIVERS`` processes (each value to exactly one of them);
- a chaos thread (here) that SIGKILLs a random sender (feed or queue), subscriber (steady
  or churner) or the registry (its pid from a ``ping``), starts a replacement (a sender's
  replacement is a new *incarnation* of the same sender id) and measures the recovery.

Values are small (0-300 B, most), medium (2-12 KiB, inline) or large (1-1.3 MiB, about one
per second per sender at most) random bytes, sent as the tuple
``(sender id, incarnation, seq, incarnation start, send stamp, crc32, payload)``; the crc
covers the first three fields and the payload. Stamps are ``time.monotonic()`` taken just
before the send (CLOCK_MONOTONIC is system-wide on Linux, so stamps compare across
processes).

What each receiver checks, per (sender id, incarnation) = "key":

- corruption: the crc does not match, or the value is not such a tuple;
- duplicate: the same seq twice; reorder: a seq lower than one already seen;
- loss. A *subscription period* starts when ``subscribe`` returned (time ``t_sub``) and
  ends when the subscription ends (unsubscribe, scope close, or a failure on ``err()``
  such as ``SenderDiedError``, after which a steady subscriber subscribes again: a new
  period). Every value whose send *started* after ``t_sub`` of the current period must be
  received while the receiving process lives. Concretely it counts as lost:
  (a) a gap between two seqs of one key received one after the other, when the earlier
      of the two was sent after ``t_sub`` (then every seq between them was too);
  (b) the seqs before the first one received of a key, if that incarnation began
      (its first send started) after ``t_sub``;
  (c) at the end of the run, the tail of a key of a sender that is alive at the end,
      up to the last seq it sent, when that last send started after ``t_sub``.
  A gap after a value sent before ``t_sub`` is not loss (it may span the time between two
  periods, when values were not addressed to the channel), and neither is the possibly
  partial delivery of the last value of an incarnation that was killed mid-send: its send
  never returned, so it may have reached some channels and not others (nothing follows it
  in that incarnation, so rules (a) and (c) never count it).
- the work queue: over the union of what all queue receivers got (they are not killed),
  each key's seqs must be exactly 0..m (no gap, no value twice across receivers, each
  receiver in increasing order), with m the last seq sent for a sender alive at the end;
  for a killed incarnation m is whatever it last committed.

Recovery times (seconds), by kind of kill:

- subscriber: from the SIGKILL until none of the victim's subscriptions is active in any
  feed's subscription table (what ``feed.statistics().subscriptions`` counts);
- sender: from the SIGKILL until the feed (or queue) makes progress again: its sent
  counter moves past its value at the kill (another sender's send completed), which
  requires the victim's feed send lock to be released if it held it;
- registry: from the SIGKILL until a new registry answers ``ping``.

It also samples the RSS of every process (this one, the registry, every worker) each
second with psutil, and reports per process the growth from its first minute to its last
minute (for processes that lived under two minutes: first third vs last third).

At the end: senders stop and report their last seq, receivers drain and report, the queue
is closed, every process exits normally, this process lets go of the namespace, waits for
the registry to exit by itself, runs ``shmfeed gc`` and lists what of the namespace is left
in /dev/shm. Exit status 1 on any violation (corruption, duplicate, reorder, loss, a worker
error, a recovery not reached within ``--recovery-bound`` seconds, a leftover in /dev/shm),
else 0. Whatever happens, every process started (and the registry) is killed at the end:
this process makes itself a child subreaper so orphans stay in its tree.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

FEEDS = 3
SENDERS_PER_FEED = 2
CHURNERS = 2
QUEUE_SENDERS = 2
QUEUE_RECEIVERS = 3
BIG = 1 << 20
BIG_RING = 8 << 20
MAX_LISTED = 40  # violations listed in the report (all are counted)

# ======================================================================================
# Values and checking (used in the workers)
# ======================================================================================


def checksum(sid: str, inc: int, seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(f"{sid}/{inc}/{seq}".encode()))


class Payloads:
    """Random payload sizes: mostly small, some medium (inline), a few large (>= 1 MiB)."""

    def __init__(self, rng: random.Random, big_every: float) -> None:
        self.rng = rng
        self.big_every = big_every
        self.last_big = time.monotonic() - rng.uniform(0, big_every)

    def next(self) -> bytes:
        rng = self.rng
        now = time.monotonic()
        if now - self.last_big > self.big_every and rng.random() < 0.05:
            self.last_big = now
            return os.urandom(rng.randint(BIG, BIG + 300_000))
        r = rng.random()
        if r < 0.93:
            return rng.randbytes(rng.randint(0, 300))
        return rng.randbytes(rng.randint(2_000, 12_000))


class Verifier:
    """Checks one receiving process's values (see the module docstring for the rules)."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.last: dict[tuple[str, int], tuple[int, float]] = {}  # key -> (last seq, its send stamp)
        self.counts = {"received": 0, "bytes": 0, "large": 0, "corrupt": 0, "duplicate": 0, "reorder": 0,
                       "lost": 0, "scope": 0}
        self.violations: list[str] = []

    def _violation(self, kind: str, amount: int, text: str) -> None:
        self.counts[kind] += amount
        if len(self.violations) < MAX_LISTED:
            self.violations.append(f"{self.who}: {kind}: {text}")

    def check(self, value: Any, t_sub: Any) -> tuple[str, int] | None:
        """Check one value; ``t_sub(feed)`` (or a number) is when the current period began."""
        self.counts["received"] += 1
        try:
            sid, inc, seq, t0, stamp, crc, payload = value
            ok = type(payload) is bytes and checksum(sid, inc, seq, payload) == crc
        except Exception:  # noqa: BLE001 - anything malformed is corruption
            ok = False
        if not ok:
            self._violation("corrupt", 1, f"bad value {str(value)[:120]}")
            return None
        self.counts["bytes"] += len(payload)
        if len(payload) >= BIG:
            self.counts["large"] += 1
        key = (sid, inc)
        if callable(t_sub):
            t_sub = t_sub(feed_of(sid))
        previous = self.last.get(key)
        if previous is None:
            if seq and t0 > t_sub:
                self._violation("lost", seq, f"{key}: first value received is seq {seq}, but the incarnation "
                                              f"began {t0 - t_sub:.3f}s after subscribing")
        else:
            last, last_stamp = previous
            if seq == last:
                self._violation("duplicate", 1, f"{key}: seq {seq} twice")
                return key
            if seq < last:
                self._violation("reorder", 1, f"{key}: seq {seq} after {last}")
                return key
            if seq > last + 1 and last_stamp > t_sub:
                self._violation("lost", seq - last - 1, f"{key}: seqs {last + 1}..{seq - 1} missing")
        self.last[key] = (seq, stamp)
        return key

    def tail_missing(self, finals: dict[tuple[str, int], tuple[int, float]], t_sub: dict[str, float]) -> dict:
        """Keys (of the given feeds) whose last value, sent after subscribing, is not yet here."""
        missing = {}
        for key, (last_seq, last_stamp) in finals.items():
            feed = feed_of(key[0])
            if feed not in t_sub or last_stamp <= t_sub[feed] or last_seq < 0:
                continue
            got = self.last.get(key, (-1, 0))[0]
            if got < last_seq:
                missing[key] = (got, last_seq)
        return missing


def feed_of(sid: str) -> str:
    return f"soak-f{sid[1:].split('s')[0]}" if sid.startswith("f") else "queue"


# ======================================================================================
# Workers (module level: forkserver children import this module)
# ======================================================================================


class Stop(Exception):
    pass


class Control:
    """The worker's end of its pipe to the supervisor."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.pending: list[Any] = []

    def send(self, *message: Any) -> None:
        self.conn.send(message)

    def poll(self) -> Any:
        """The next command if one is waiting, else None."""
        if self.pending:
            return self.pending.pop(0)
        if self.conn.poll():
            return self.conn.recv()
        return None

    def wait(self, timeout: float) -> Any:
        if self.pending:
            return self.pending.pop(0)
        if self.conn.poll(timeout):
            return self.conn.recv()
        return None

    def wait_exit(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            command = self.wait(1.0)
            if command is not None and command[0] == "exit":
                return


def worker(role: str, slot: str, inc: int, namespace: str, seed: int, conn: Any, params: dict) -> None:
    os.environ["SHMFEED_NAMESPACE"] = namespace
    control = Control(conn)
    try:
        {"sender": run_sender, "qsender": run_sender, "sub": run_subscriber, "churn": run_churner,
         "qrecv": run_queue_receiver}[role](control, slot, inc, random.Random(seed), params)
    except BaseException:  # noqa: BLE001 - reported to the supervisor
        with contextlib.suppress(Exception):
            control.send("error", slot, traceback.format_exc())
        raise


def run_sender(control: Control, slot: str, inc: int, rng: random.Random, params: dict) -> None:
    import shmfeed

    queue = params.get("queue")
    if queue is not None:
        send = lambda value: queue.send(value, timeout=60)  # noqa: E731
    else:
        send = shmfeed.Feed(params["feed"]).send
    payloads = Payloads(rng, params["big_every"])
    pace = params["pace"]
    control.send("ready", slot, os.getpid())
    t0 = time.monotonic()
    seq, last_stamp, delivered, last_report = 0, 0.0, 0, 0.0
    while True:
        command = control.poll()
        if command is not None and command[0] == "stop":
            break
        payload = payloads.next()
        stamp = time.monotonic()
        result = send((slot, inc, seq, t0, stamp, checksum(slot, inc, seq, payload), payload))
        delivered += result or 0
        last_stamp = stamp
        seq += 1
        now = time.monotonic()
        if now - last_report > 0.25:
            control.send("progress", slot, inc, seq)
            last_report = now
        time.sleep(rng.uniform(0, pace))
    control.send("final", slot, inc, seq - 1, last_stamp, {"sent": seq, "delivered": delivered})
    control.wait_exit()


def _drain_command(control: Control) -> Any:
    command = control.poll()
    if command is not None and command[0] in ("drain", "stop"):
        return command
    return None


def run_subscriber(control: Control, slot: str, inc: int, rng: random.Random, params: dict) -> None:
    """A steady subscriber of one or more feeds, waiting with select; resubscribes on failure."""
    import shmfeed

    feeds = {name: shmfeed.Feed(name) for name in params["feeds"]}
    channel = shmfeed.Channel(capacity=params["capacity"], buffer_size=params.get("buffer_size"))
    verifier = Verifier(f"{slot}#{inc}")
    subs: dict[str, Any] = {}
    t_sub: dict[str, float] = {}
    failures: list[str] = []

    def subscribe(name: str) -> None:
        subs[name] = feeds[name].subscribe(channel)
        t_sub[name] = time.monotonic()

    for name in feeds:
        subscribe(name)
    control.send("ready", slot, os.getpid())
    slow = params.get("slow", 0.0)
    finals = None
    deadline = None
    while True:
        if finals is None:
            command = _drain_command(control)
            if command is not None:
                finals = {tuple(k): tuple(v) for k, v in command[1]}
                deadline = time.monotonic() + params["drain_timeout"]
        if finals is not None and (not verifier.tail_missing(finals, t_sub) or time.monotonic() > deadline):
            break
        errs = {sub.err(): name for name, sub in subs.items()}
        try:
            ready, value = shmfeed.select(channel, *errs, timeout=0.1)
        except TimeoutError:
            continue
        if ready is channel:
            verifier.check(value, lambda feed: t_sub.get(feed, float("inf")))
            if slow and rng.random() < 0.5:
                time.sleep(slow)
        else:
            name = errs[ready]
            failures.append(f"{name}: {value!r}")
            subs[name].unsubscribe()
            subscribe(name)
    missing = verifier.tail_missing(finals, t_sub)
    for key, (got, last_seq) in missing.items():
        verifier._violation("lost", last_seq - got, f"{key}: tail {got + 1}..{last_seq} never arrived")
    stats = channel.statistics()
    for sub in subs.values():
        sub.unsubscribe()
    control.send("result", slot, inc, {"counts": verifier.counts, "violations": verifier.violations,
                                      "subscription_failures": failures, "spilled": stats.spilled,
                                      "ring_bytes": stats.ring_bytes})
    control.wait_exit()
    channel.close()


def run_churner(control: Control, slot: str, inc: int, rng: random.Random, params: dict) -> None:
    """Subscribe a fresh channel for a short period, mostly inside a fresh named scope; repeat."""
    import shmfeed

    feeds = {name: shmfeed.Feed(name) for name in params["feeds"]}
    verifier = Verifier(f"{slot}#{inc}")
    figures = {"periods": 0, "scopes_opened": 0, "scopes_closed": 0, "unsubscribes": 0, "failures": 0}
    control.send("ready", slot, os.getpid())
    n = 0
    stopping = False
    while not stopping:
        n += 1
        name = rng.choice(sorted(feeds))
        channel = shmfeed.Channel(capacity=32)
        scope = shmfeed.SubscriptionScope(f"soak-{slot}-{inc}-{n}") if rng.random() < 0.7 else None
        sub = feeds[name].subscribe(channel)
        t_sub = time.monotonic()
        handle = sub
        if scope is not None:
            figures["scopes_opened"] += 1
            handle = scope.track(sub)
            if handle is None or scope.count() != 1:
                verifier._violation("scope", 1, f"scope {scope.name}: track gave {handle!r}, count {scope.count()}")
                handle = sub
        figures["periods"] += 1
        until = time.monotonic() + rng.uniform(0.2, 1.5)
        failed = False
        while time.monotonic() < until:
            if _drain_command(control) is not None:
                stopping = True
                break
            try:
                ready, value = shmfeed.select(channel, handle.err(), timeout=0.05)
            except TimeoutError:
                continue
            if ready is channel:
                verifier.check(value, t_sub)
            else:
                figures["failures"] += 1
                failed = True
                break
        if scope is not None and rng.random() < 0.6:
            scope.close()
            figures["scopes_closed"] += 1
            how = "scope close"
        else:
            handle.unsubscribe()
            figures["unsubscribes"] += 1
            how = "unsubscribe"
            if scope is not None:
                scope.close()
                figures["scopes_closed"] += 1
        if not failed:
            try:
                end = handle.err().recv(timeout=5)
            except TimeoutError:
                end = "still open after 5 s"
            if end is not None and not isinstance(end, shmfeed.SubscriptionFailed):
                verifier._violation("scope", 1, f"after {how}, err() gave {end!r} instead of closing")
        if scope is not None and (scope.count() != 0 or scope.track(sub) is not None):
            verifier._violation("scope", 1, f"closed scope {scope.name} still tracks")
        while True:  # what was delivered before the end stays readable
            try:
                verifier.check(channel.recv(timeout=0), t_sub)
            except (TimeoutError, shmfeed.ChannelClosed):
                break
        channel.close()
        del channel, scope, sub, handle
    figures.update(verifier.counts)
    control.send("result", slot, inc, {"counts": figures, "violations": verifier.violations})
    control.wait_exit()


def run_queue_receiver(control: Control, slot: str, inc: int, rng: random.Random, params: dict) -> None:
    import shmfeed

    queue = params["queue"]
    verifier = Verifier(f"{slot}#{inc}")
    seqs: dict[tuple[str, int], list[int]] = {}
    control.send("ready", slot, os.getpid())
    while True:
        try:
            value = queue.recv(timeout=1.0)
        except TimeoutError:
            continue
        except shmfeed.ChannelClosed:
            break
        key = verifier.check(value, float("inf"))  # gaps are checked over the union instead
        if key is not None:
            seqs.setdefault(key, []).append(value[2])
    control.send("result", slot, inc, {"counts": verifier.counts, "violations": verifier.violations,
                                      "seqs": [[list(k), v] for k, v in seqs.items()]})
    control.wait_exit()


# ======================================================================================
# Supervisor (this process)
# ======================================================================================


@dataclass
class Worker:
    slot: str
    role: str
    params: dict
    inc: int = 0
    process: Any = None
    conn: Any = None
    pid: int | None = None
    ready_at: float | None = None
    progress: int = 0  # seqs sent, for senders
    final: tuple | None = None
    result: dict | None = None
    killed: bool = False


@dataclass
class Run:
    namespace: str
    seed: int
    minutes: float
    recovery_bound: float
    rng: random.Random = field(init=False)
    workers: dict[str, Worker] = field(default_factory=dict)
    retired: list[Worker] = field(default_factory=list)  # killed incarnations
    lock: threading.Lock = field(default_factory=threading.Lock)
    events: threading.Condition = field(init=False)
    stopping: threading.Event = field(default_factory=threading.Event)
    violations: list[str] = field(default_factory=list)
    kills: dict[str, int] = field(default_factory=lambda: {"subscriber": 0, "sender": 0, "registry": 0})
    recovery: dict[str, list[float]] = field(default_factory=lambda: {"subscriber": [], "sender": [], "registry": []})
    rss: dict[tuple[str, int], list[tuple[float, int]]] = field(default_factory=dict)
    registry_pids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.events = threading.Condition(self.lock)

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)


def set_child_subreaper() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


class Supervisor:
    def __init__(self, run: Run, ctx: Any, pace: float, big_every: float) -> None:
        self.run = run
        self.ctx = ctx
        self.conns: dict[Any, Worker] = {}
        self.conns_changed = threading.Event()
        import shmfeed

        self.feeds = {f"soak-f{k}": shmfeed.Feed(f"soak-f{k}") for k in range(FEEDS)}
        self.queue = shmfeed.Channel(capacity=256)
        feeds = sorted(self.feeds)
        common = {"pace": pace, "big_every": big_every, "drain_timeout": 30.0}
        add = self._add
        for k in range(FEEDS):
            for j in range(SENDERS_PER_FEED):
                add(f"f{k}s{j}", "sender", dict(common, feed=f"soak-f{k}"))
        for j in range(QUEUE_SENDERS):
            add(f"qs{j}", "qsender", dict(common, queue=self.queue))
        add("sub0", "sub", dict(common, feeds=[feeds[0]], capacity=64))
        add("sub1", "sub", dict(common, feeds=[feeds[1]], capacity=64, buffer_size=BIG_RING))
        add("sub2", "sub", dict(common, feeds=[feeds[2]], capacity=4, slow=0.004))
        add("sub3", "sub", dict(common, feeds=feeds, capacity=128))
        for j in range(CHURNERS):
            add(f"churn{j}", "churn", dict(common, feeds=feeds))
        for j in range(QUEUE_RECEIVERS):
            add(f"qr{j}", "qrecv", dict(common, queue=self.queue))

    def _add(self, slot: str, role: str, params: dict) -> None:
        self.run.workers[slot] = Worker(slot, role, params)

    # --- processes ------------------------------------------------------------------------

    def start(self, worker: Worker) -> None:
        parent_end, child_end = self.ctx.Pipe()
        seed = self.run.seed * 1_000_003 + zlib.crc32(f"{worker.slot}#{worker.inc}".encode())
        process = self.ctx.Process(
            target=worker_entry, name=f"soak-{worker.slot}#{worker.inc}",
            args=(worker.role, worker.slot, worker.inc, self.run.namespace, seed, child_end, worker.params),
            daemon=True,
        )
        process.start()
        child_end.close()
        with self.run.lock:
            worker.process, worker.conn, worker.pid = process, parent_end, process.pid
            worker.ready_at, worker.progress, worker.final, worker.result, worker.killed = None, 0, None, None, False
            self.conns[parent_end] = worker
        self.conns_changed.set()

    def replace(self, worker: Worker) -> Worker:
        """Retire a killed worker and start the next incarnation of its slot."""
        with self.run.lock:
            worker.killed = True
            retired = Worker(worker.slot, worker.role, worker.params, worker.inc, worker.process, worker.conn,
                             worker.pid, worker.ready_at, worker.progress, killed=True)
            self.run.retired.append(retired)
            self.conns.pop(worker.conn, None)
            worker.inc += 1
        with contextlib.suppress(Exception):
            worker.conn.close()
        worker.process.join(5)
        self.start(worker)
        return worker

    def wait_ready(self, workers: list[Worker], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.run.events:
            while not all(w.ready_at for w in workers):
                if not self.run.events.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() > deadline:
                    missing = [w.slot for w in workers if not w.ready_at]
                    raise RuntimeError(f"workers not ready after {timeout} s: {missing}")

    # --- messages from the workers --------------------------------------------------------------

    def reader(self) -> None:
        run = self.run
        while True:
            with run.lock:
                conns = list(self.conns)
            if not conns:
                if self.conns_changed.wait(0.2):
                    self.conns_changed.clear()
                if run.stopping.is_set() and not self.conns:
                    return
                continue
            try:
                ready = multiprocessing.connection.wait(conns, timeout=0.2)
            except (OSError, ValueError):
                continue  # a connection was closed meanwhile (a killed worker's)
            for conn in ready:
                with run.lock:
                    worker = self.conns.get(conn)
                if worker is None:
                    continue
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    with run.lock:
                        self.conns.pop(conn, None)
                        if not worker.killed and worker.result is None:  # died by itself
                            worker.final = worker.final or ("error",)
                            worker.result = {"error": True}
                        run.events.notify_all()
                    continue
                self.handle(worker, message)

    def handle(self, worker: Worker, message: tuple) -> None:
        run = self.run
        kind = message[0]
        with run.lock:
            if kind == "ready":
                worker.ready_at = time.monotonic()
            elif kind == "progress":
                worker.progress = message[3]
            elif kind == "final":
                worker.final = message[1:]
            elif kind == "result":
                worker.result = message[3]
            elif kind == "error":
                run.violations.append(f"worker {message[1]}#{worker.inc} failed:\n{message[2]}")
                worker.result = worker.result or {"error": True}
                worker.final = worker.final or ("error",)
            run.events.notify_all()

    # --- RSS ------------------------------------------------------------------------------

    def sampler(self) -> None:
        import psutil

        run = self.run
        while not run.stopping.wait(1.0):
            with run.lock:
                targets = [(w.slot, w.pid) for w in run.workers.values() if w.pid and not w.killed]
            targets.append(("supervisor", os.getpid()))
            registry = registry_pid(run.namespace, timeout=0.5)
            if registry:
                targets.append(("registry", registry))
            now = time.monotonic()
            for name, pid in targets:
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
                run.rss.setdefault((name, pid), []).append((now, rss))

    # --- chaos ------------------------------------------------------------------------------

    def chaos(self, until: float) -> None:
        run = self.run
        rng = run.rng
        order = ["subscriber", "sender", "registry"]  # each kind early, then at random
        time.sleep(1.0)
        while not run.stopping.is_set() and time.monotonic() < until - 5.0:
            scheduled = bool(order)
            kind = order.pop(0) if order else rng.choices(["subscriber", "sender", "registry"], [5, 4, 2])[0]
            try:
                done = {"subscriber": self.kill_subscriber, "sender": self.kill_sender,
                        "registry": self.kill_registry}[kind]()
            except Exception:  # noqa: BLE001
                run.violation(f"chaos ({kind}) failed:\n{traceback.format_exc()}")
                return
            if not done:
                if scheduled:
                    order.insert(0, kind)
                if run.stopping.wait(0.2):
                    return
                continue
            if run.stopping.wait(rng.uniform(0.3, 1.2)):
                return

    def _victim(self, roles: tuple[str, ...], extra: Any = None) -> Worker | None:
        now = time.monotonic()
        with self.run.lock:
            candidates = [w for w in self.run.workers.values()
                          if w.role in roles and w.ready_at and now - w.ready_at > 0.5 and w.result is None
                          and w.process.is_alive() and (extra is None or extra(w))]
        return self.run.rng.choice(candidates) if candidates else None

    def _bounded(self, condition: Any) -> float | None:
        deadline = time.monotonic() + self.run.recovery_bound
        while time.monotonic() < deadline:
            if condition():
                return time.monotonic()
            time.sleep(0.002)
        return None

    def _record(self, kind: str, what: str, killed_at: float, recovered_at: float | None) -> None:
        run = self.run
        with run.lock:
            run.kills[kind] += 1
            if recovered_at is None:
                run.violations.append(f"{kind} kill ({what}): not recovered within {run.recovery_bound} s")
            else:
                run.recovery[kind].append(recovered_at - killed_at)

    def kill_subscriber(self) -> bool:
        victim = self._victim(("sub", "churn"))
        if victim is None:
            return False
        pid = victim.pid
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False  # it died by itself (an error, reported)
        killed_at = time.monotonic()
        self.replace(victim)
        recovered = self._bounded(lambda: not any(pid in subscription_owners(f) for f in self.feeds.values()))
        self._record("subscriber", f"{victim.slot} pid {pid}", killed_at, recovered)
        return True

    def kill_sender(self) -> bool:
        def has_live_peer(w: Worker) -> bool:
            if w.role == "qsender":
                group = [o for o in self.run.workers.values() if o.role == "qsender"]
            else:
                group = [o for o in self.run.workers.values() if o.params.get("feed") == w.params["feed"]]
            return any(o is not w and o.ready_at and o.progress > 0 for o in group)

        victim = self._victim(("sender", "qsender"), has_live_peer)
        if victim is None:
            return False
        pid = victim.pid
        if victim.role == "qsender":
            sent = lambda: self.queue.statistics().sent  # noqa: E731
        else:
            feed = self.feeds[victim.params["feed"]]
            sent = lambda: feed.statistics().sent  # noqa: E731
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        killed_at = time.monotonic()
        before = sent()
        self.replace(victim)
        recovered = self._bounded(lambda: sent() > before)
        self._record("sender", f"{victim.slot} pid {pid}", killed_at, recovered)
        return True

    def kill_registry(self) -> bool:
        from shmfeed import _registry_client

        namespace = self.run.namespace
        pid = registry_pid(namespace)
        if pid is None:
            _registry_client.ensure_running(namespace)
            return False
        self.run.registry_pids.add(pid)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # ours if it was orphaned (we are a subreaper)
        nudged = [killed_at]

        def replaced() -> bool:
            new = registry_pid(namespace, timeout=0.2)
            if new is not None and new != pid:
                self.run.registry_pids.add(new)
                return True
            # Blocked waiters restart it within _waker.WATCHDOG_SECONDS; this is only the
            # fallback ("the next use starts a new one"), late enough to show if they fail.
            if time.monotonic() - nudged[0] > 2.0:
                nudged[0] = time.monotonic()
                _registry_client.ensure_running(namespace)
            return False

        recovered = self._bounded(replaced)
        self._record("registry", f"pid {pid}", killed_at, recovered)
        return True


def worker_entry(*args: Any) -> None:
    worker(*args)


def registry_pid(namespace: str, timeout: float = 2.0) -> int | None:
    """The pid of the namespace's registry, or None if none answers (shmfeed imported late)."""
    from shmfeed.testing import ping_registry

    return ping_registry(namespace, timeout)


def subscription_owners(feed: Any) -> set[int]:
    """Pids owning an active subscription of the feed (read from its table, no lock)."""
    from shmfeed import _layout as L

    core = feed._open()
    table = core.table
    owners = set()
    for entry in range(L.table_high(core.words)):
        state = int(table[entry * L.FEED_ENTRY_WORDS + 3])
        if state & 0xFFFF_FFFF == L.SUB_ACTIVE_STATE:
            owners.add(state >> 32)
    return owners


# --- the run -------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def soak(run: Run, pace: float, big_every: float, log: Any) -> dict:
    from shmfeed import _gc, _registry_client, _release

    namespace = run.namespace
    os.environ["SHMFEED_NAMESPACE"] = namespace
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["shmfeed"])
    supervisor = Supervisor(run, ctx, pace, big_every)
    threads = [threading.Thread(target=supervisor.reader, daemon=True, name="reader"),
               threading.Thread(target=supervisor.sampler, daemon=True, name="rss")]
    for thread in threads:
        thread.start()
    workers = list(run.workers.values())
    for worker_ in workers:
        supervisor.start(worker_)
    supervisor.wait_ready(workers, 120)
    log(f"soak: namespace {namespace!r}: {len(workers)} workers ready; load for {run.minutes * 60:.0f} s")
    started = time.monotonic()
    until = started + run.minutes * 60
    chaos = threading.Thread(target=supervisor.chaos, args=(until,), daemon=True, name="chaos")
    chaos.start()
    while time.monotonic() < until:
        time.sleep(0.2)
    load_s = time.monotonic() - started
    run.stopping.set()  # stops chaos and the sampler
    chaos.join(run.recovery_bound + 10)
    live = list(run.workers.values())
    supervisor.wait_ready(live, 60)
    log(f"soak: load done after {load_s:.1f} s; stopping senders")

    # 1. Senders stop and say what they sent last.
    senders = [w for w in live if w.role in ("sender", "qsender")]
    for w in senders:
        with contextlib.suppress(OSError):
            w.conn.send(("stop",))
    wait_for(run, lambda: all(w.final for w in senders), 60, "senders' final reports")
    finals = [[[w.slot, w.inc], [w.final[2], w.final[3]]] for w in senders
              if w.role == "sender" and w.final and w.final[0] != "error"]
    # 2. Subscribers drain up to those values; churners end their period.
    receivers = [w for w in live if w.role in ("sub", "churn")]
    for w in receivers:
        with contextlib.suppress(OSError):
            w.conn.send(("drain", finals))
    wait_for(run, lambda: all(w.result for w in receivers), 90, "subscribers' results")
    # 3. The queue is closed: its receivers drain it and report.
    supervisor.queue.close()
    queue_receivers = [w for w in live if w.role == "qrecv"]
    wait_for(run, lambda: all(w.result for w in queue_receivers), 60, "queue receivers' results")
    queue_stats = supervisor.queue.statistics()
    feed_stats = {name: feed.statistics() for name, feed in supervisor.feeds.items()}
    # 4. Everyone exits normally.
    for w in live:
        with contextlib.suppress(OSError):
            w.conn.send(("exit",))
    for w in live:
        w.process.join(30)
        if w.process.exitcode != 0:
            run.violation(f"worker {w.slot}#{w.inc} exited with {w.process.exitcode}")
    elapsed = time.monotonic() - started

    report = summarise(run, live, load_s, elapsed, queue_stats, feed_stats)

    # 5. Let go of the namespace; the registry leaves by itself; gc; what is left.
    del supervisor.feeds, supervisor.queue
    gc.collect()
    _release.release_namespace(namespace)
    idle = float(os.environ.get("SHMFEED_REGISTRY_IDLE", "2.0"))
    deadline = time.monotonic() + idle + 15
    while _registry_client.is_running(namespace) and time.monotonic() < deadline:
        time.sleep(0.05)
    report["registry_exited_by_itself"] = not _registry_client.is_running(namespace)
    if not report["registry_exited_by_itself"]:
        pid = registry_pid(namespace)
        run.violation(f"the registry (pid {pid}) did not exit within {idle + 15:.0f} s of the namespace's end")
        if pid:
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    before_gc = _gc.namespace_entries(namespace)
    gc_run = subprocess.run([sys.executable, "-m", "shmfeed._cli", "gc", "--namespace", namespace],
                            capture_output=True, text=True, timeout=60)
    left = _gc.namespace_entries(namespace)
    report["dev_shm"] = {"before_final_gc": before_gc, "final_gc_output": gc_run.stdout.strip().splitlines(),
                         "left": left}
    if left:
        run.violation(f"left in /dev/shm after shmfeed gc: {left}")
    report["violations"] = run.violations[:MAX_LISTED]
    report["violation_count"] = sum(report["violation_counts"].values()) + len(
        [v for v in run.violations if not v.startswith("(value) ")])
    report["ok"] = report["violation_count"] == 0
    return report


def wait_for(run: Run, predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    with run.events:
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                run.violations.append(f"timed out waiting for {what}")
                return
            run.events.wait(min(remaining, 0.5))


def summarise(run: Run, live: list[Worker], load_s: float, elapsed: float, queue_stats: Any,
              feed_stats: dict) -> dict:
    counts = {"corrupt": 0, "duplicate": 0, "reorder": 0, "lost": 0, "scope": 0}
    received = bytes_ = large = 0
    listed: list[str] = []
    subscribers = {}
    churn = {"periods": 0, "scopes_opened": 0, "scopes_closed": 0, "unsubscribes": 0, "failures": 0}
    failures = 0
    for w in live:
        if w.role not in ("sub", "churn", "qrecv") or not w.result or "counts" not in w.result:
            continue
        c = w.result["counts"]
        for k in counts:
            counts[k] += c.get(k, 0)
        received += c["received"]
        bytes_ += c["bytes"]
        large += c["large"]
        listed += w.result["violations"]
        if w.role == "sub":
            failures += len(w.result["subscription_failures"])
            subscribers[w.slot] = {"received": c["received"], "large": c["large"], "spilled": w.result["spilled"],
                                   "ring_bytes": w.result["ring_bytes"],
                                   "subscription_failures": w.result["subscription_failures"][:5]}
        if w.role == "churn":
            for k in churn:
                churn[k] += c.get(k, 0)
    # The work queue: the union over the receivers.
    union: dict[tuple[str, int], list[int]] = {}
    for w in live:
        if w.role == "qrecv" and w.result and "seqs" in w.result:
            for key, seqs in w.result["seqs"]:
                union.setdefault(tuple(key), []).extend(seqs)
    queue_finals = {(w.slot, w.inc): w.final[2] for w in live if w.role == "qsender" and w.final
                    and w.final[0] != "error"}
    queue_received = 0
    for key in sorted(set(union) | set(queue_finals)):
        seqs = union.get(key, [])
        queue_received += len(seqs)
        distinct = set(seqs)
        if len(distinct) != len(seqs):
            counts["duplicate"] += len(seqs) - len(distinct)
            listed.append(f"queue: {key}: {len(seqs) - len(distinct)} value(s) received twice")
        top = queue_finals.get(key, max(distinct, default=-1))
        missing = set(range(top + 1)) - distinct
        if missing:
            counts["lost"] += len(missing)
            listed.append(f"queue: {key}: {len(missing)} value(s) lost, e.g. {sorted(missing)[:5]}")
    with run.lock:
        run.violations[:0] = [f"(value) {text}" for text in listed]
    sends = sum(s.sent for s in feed_stats.values())
    delivered = sum(s.delivered for s in feed_stats.values())
    recovery = {}
    for kind, times in run.recovery.items():
        recovery[kind] = ({"count": len(times), "max_s": round(max(times), 4), "p99_s": round(percentile(times, 0.99), 4),
                           "median_s": round(statistics.median(times), 4)} if times else {"count": 0})
    return {
        "namespace": run.namespace,
        "seed": run.seed,
        "minutes": run.minutes,
        "load_s": round(load_s, 1),
        "elapsed_s": round(elapsed, 1),
        "processes": {"workers": len(live), "incarnations_killed": len(run.retired),
                      "registries_seen": len(run.registry_pids)},
        "totals": {
            "feed_sends": sends,
            "feed_deliveries": delivered,
            "values_received": received,
            "bytes_received": bytes_,
            "large_values_received": large,
            "queue_sent": queue_stats.sent,
            "queue_received": queue_received,
            "queue_spilled": queue_stats.spilled,
            "subscription_failures_resubscribed": failures,
            "churn": churn,
        },
        "subscribers": subscribers,
        "rates": {
            "feed_sends_per_s": round(sends / load_s, 1),
            "deliveries_per_s": round(delivered / load_s, 1),
            "queue_values_per_s": round(queue_stats.sent / load_s, 1),
            "mib_received_per_s": round(bytes_ / load_s / (1 << 20), 2),
        },
        "kills": dict(run.kills),
        "kills_survived": dict(run.kills),
        "recovery": recovery,
        "rss": rss_report(run),
        "violation_counts": counts,
    }


def rss_report(run: Run) -> dict:
    out = {}
    for (name, pid), samples in sorted(run.rss.items()):
        if len(samples) < 3:
            continue
        t_first, t_last = samples[0][0], samples[-1][0]
        life = t_last - t_first
        window = 60.0 if life >= 120 else life / 3
        first = [r for t, r in samples if t <= t_first + window]
        last = [r for t, r in samples if t >= t_last - window]
        mib = 1 << 20
        out[f"{name}/{pid}"] = {"lived_s": round(life, 1), "samples": len(samples),
                                "first_mib": round(sum(first) / len(first) / mib, 1),
                                "last_mib": round(sum(last) / len(last) / mib, 1),
                                "growth_mib": round((sum(last) / len(last) - sum(first) / len(first)) / mib, 1),
                                "max_mib": round(max(r for _, r in samples) / mib, 1),
                                "sixths_mib": _sixths(samples, t_first, life)}
    return out


def _sixths(samples: list[tuple[float, int]], start: float, life: float) -> list[float]:
    """Mean RSS (MiB) over each sixth of a process's life: a leak climbs sixth after sixth,
    a warm-up levels off."""
    means = []
    for part in range(6):
        low, high = start + life * part / 6, start + life * (part + 1) / 6
        window = [r for t, r in samples if low <= t <= high]
        means.append(round(sum(window) / len(window) / (1 << 20), 1) if window else 0.0)
    return means


def kill_tree(run: Run) -> list[int]:
    """SIGKILL every descendant (and any registry seen), reap them; the pids killed."""
    import psutil

    killed = []
    me = psutil.Process()
    for _ in range(3):
        try:
            children = me.children(recursive=True)
        except psutil.Error:
            children = []
        pids = {c.pid for c in children}  # a registry is in the tree: we are a subreaper
        current = registry_pid(run.namespace, timeout=0.5)
        if current:
            pids.add(current)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        for pid in pids:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)
        time.sleep(0.1)
    return killed


def print_human(report: dict) -> None:
    p = print
    p(f"soak: namespace {report['namespace']!r} seed {report['seed']}: load {report['load_s']} s, "
      f"total {report['elapsed_s']} s")
    t = report["totals"]
    r = report["rates"]
    p(f"  feeds: {t['feed_sends']} sends ({r['feed_sends_per_s']}/s), {t['feed_deliveries']} deliveries "
      f"({r['deliveries_per_s']}/s); received {t['values_received']} values, "
      f"{t['bytes_received'] / (1 << 20):.1f} MiB ({r['mib_received_per_s']} MiB/s), "
      f"{t['large_values_received']} of >= 1 MiB")
    p(f"  queue: {t['queue_sent']} sent, {t['queue_received']} received, {t['queue_spilled']} spilled")
    p(f"  churn: {t['churn']}; subscriptions failed and renewed: {t['subscription_failures_resubscribed']}")
    for slot, s in report["subscribers"].items():
        p(f"  {slot}: ring {s['ring_bytes']} B, received {s['received']}, large {s['large']}, spilled {s['spilled']}")
    p(f"  kills survived: {report['kills_survived']}")
    for kind, rec in report["recovery"].items():
        if rec["count"]:
            p(f"  recovery {kind:10s}: n={rec['count']} median {rec['median_s'] * 1000:.0f} ms, "
              f"p99 {rec['p99_s'] * 1000:.0f} ms, max {rec['max_s'] * 1000:.0f} ms")
    longest = max((g["lived_s"] for g in report["rss"].values()), default=0)
    growth = sorted(((n, g) for n, g in report["rss"].items() if g["lived_s"] >= longest / 2),
                    key=lambda kv: -kv[1]["growth_mib"])
    p(f"  RSS (MiB) of the {len(growth)} longest-lived processes, first vs last minute (or third):")
    for name, g in growth[:12]:
        p(f"    {name:28s} {g['first_mib']:8.1f} -> {g['last_mib']:8.1f}  ({g['growth_mib']:+.1f}, max {g['max_mib']})"
          f"  lived {g['lived_s']} s; by sixths {g['sixths_mib']}")
    d = report["dev_shm"]
    p(f"  /dev/shm before final gc: {len(d['before_final_gc'])} entries; after: {d['left'] or 'nothing'}")
    p(f"  violations: {report['violation_count']} {report['violation_counts']}")
    for v in report["violations"]:
        p(f"    {v}")
    p("  OK" if report["ok"] else "  FAILED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="minutes of load (default 5)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--namespace", default=None, help="namespace (default: $SHMFEED_NAMESPACE or a fresh one)")
    parser.add_argument("--pace", type=float, default=0.01, help="senders sleep uniform(0, PACE) s between sends")
    parser.add_argument("--big-every", type=float, default=1.0, help="at most one >= 1 MiB value per sender per S s")
    parser.add_argument("--recovery-bound", type=float, default=5.0, help="a recovery slower than this is a violation")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    namespace = args.namespace or os.environ.get("SHMFEED_NAMESPACE") or f"soak-{uuid.uuid4().hex[:12]}"
    run = Run(namespace, seed, args.minutes, args.recovery_bound)
    log = (lambda text: print(text, file=sys.stderr, flush=True))
    set_child_subreaper()
    report: dict | None = None
    try:
        report = soak(run, args.pace, args.big_every, log)
    except BaseException as error:  # noqa: BLE001 - reported (and the status says so)
        run.violation(f"soak failed:\n{traceback.format_exc()}")
        log(run.violations[-1])
        report = {"namespace": namespace, "seed": seed, "ok": False, "error": repr(error),
                  "violations": run.violations[:MAX_LISTED], "violation_count": len(run.violations),
                  "kills": dict(run.kills), "processes": {}}
    finally:
        run.stopping.set()
        leftover = kill_tree(run)
        if leftover and report is not None:
            report["processes"]["killed_at_end"] = leftover
        with contextlib.suppress(Exception):
            from shmfeed import _gc, _registry_client

            if _gc.namespace_entries(namespace):
                _gc.sweep(namespace)
            _registry_client.forget_dead_registry(namespace)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    elif "error" in report:
        print(f"soak: FAILED: {report['error']}")
        for text in report["violations"]:
            print(f"  {text}")
    else:
        print_human(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
