#!/usr/bin/env python3
"""Side-by-side benchmark: shmfeed vs. other local IPC transports.

    python tools/bench.py [--quick] [--json] [--repeat N] [--events-scale F] [--png FILE] [--transports a,b]
    python tools/bench.py --report RUN.json [--png FILE]   (the tables, and chart, of a saved --json run)
    python tools/bench.py --bridge [--quick] [--json] [--repeat N]   (the NATS bridge: tools/bench_bridge.py)

Throughput: the same lossless fan-out job for every transport. One sender process sends N
values; each of 1, 2 or 4 receiver processes must get every value exactly once, in order
(a sequence number travels in the value; a violation makes the run exit non-zero). Time
runs from the first send until the last receiver got the last value (``time.monotonic_ns``
is system-wide on Linux). CPU is ``time.process_time()`` of the sending process (all its
threads, e.g. mp.Queue's feeder thread) and of each receiver. Every cell runs ``--repeat``
times (default 3) per transport, the transports taking turns, and reports each transport's
median run: on a shared 2-core machine one run can be several times slower than the next
for reasons outside the transport (memory traffic of neighbours), and taking turns gives
every transport the same weather.

Raw 1 MiB values (workload ``1MiB-raw``, issue 16): also ``shmfeed recv_view``, shmfeed
whose receivers take each value as a view of its file (a variant, not a peer), and
``shmfeed loan+view``, whose sender also writes each event in place (``Feed.loan``), and two
references that are not transports: events/s of one plain 1 MiB copy between two
preallocated buffers in one process (cache-hot), and the same cycling through 16 pairs of
buffers (32 MiB, more than the caches hold), each run once per round like the cells (its
median). Small and 4 KiB values: also ``shmfeed batched`` (``Feed.send_many`` of 64, ``recv_many``).

Latency: ping-pong between two processes, one channel each way; one-way = round trip / 2.
Run idle (as is) and again with low-priority (nice 19) busy loops, one pinned to each core;
under that load the two ends are pinned to different cores, for every transport alike:
unpinned, the scheduler puts them on one core (a hand-over without a cross-core wake-up,
~5 µs) or on two (~15 µs) at random from run to run, which swamped the differences.
Like the cells, each ping-pong runs ``--repeat`` times, the transports taking turns, and
each percentile shown is the median of the runs': a p99.9 of 5,000 round trips is the 5th
worst of them, so one run's can swing tenfold on a scheduler hiccup.

The parts: ``bench_transports`` (workloads, shmfeed, the peers and the floors),
``bench_runner`` (the processes and one cell's run), ``bench_report`` (summary, tables,
chart); this file parses the options and runs the cells in turn.

Peers are small ``Transport`` subclasses (``bench_transports``): to add one, implement ``setup``,
``sender``, ``receiver`` and ``teardown`` (and ``pp_*`` for the latency test), and append it
to ``TRANSPORTS``. Every peer that encodes does msgpack once per value in the sender and once
per receiver, the same work shmfeed does internally.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from typing import Any

from bench_report import _kind, draw_png, print_tables, summarize
from bench_runner import (MEMCPY_BUFFERS, _spin, _start, _stop_all_children, median_cell, median_latency, run_cell,
                          run_harness_cost, run_memcpy_reference, run_monitor_cost, run_pingpong)
from bench_transports import BASELINE, CTX, ICEORYX2_PREFIX, TRANSPORTS, RawWorkload, Transport, Workload, workloads


def _iceoryx2_entries() -> list[str]:
    """This run's iceoryx2 files in /dev/shm (``ICEORYX2_PREFIX``)."""
    try:
        return [entry for entry in os.listdir("/dev/shm") if entry.startswith(ICEORYX2_PREFIX)]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="divide event counts by 10")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    ap.add_argument("--events-scale", type=float, default=1.0, help="multiply event counts by F")
    ap.add_argument("--subs", default="1,2,4", help="subscriber counts (default 1,2,4)")
    ap.add_argument("--only", default="", help="comma-separated workloads to run (default all)")
    ap.add_argument("--transports", default="", help="comma-separated transport names to run (default all; shmfeed always)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of every throughput cell, interleaved across transports; the median is reported (default 3)")
    ap.add_argument("--png", metavar="FILE", default="", help="also draw the throughput results as a bar chart (needs matplotlib)")
    ap.add_argument("--monitor-cost", action="store_true",
                    help="only measure small-event fan-out to 4 subscribers with and without a monitor refreshing every 0.5 s")
    ap.add_argument("--bridge", action="store_true",
                    help="only the NATS bridge vs raw nats-py (tools/bench_bridge.py; honours --quick, --json, --repeat)")
    ap.add_argument("--report", metavar="JSON", default="",
                    help="run nothing: print the tables of a saved --json run (and draw --png from it)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.report:
        with open(args.report) as saved:
            doc = json.load(saved)
        if args.png:
            doc["notes"].append(draw_png(doc, args.png) or f"chart written to {args.png}")
        print_tables(doc)
        return 0 if doc["ok"] else 1
    if args.bridge:  # its own namespaces, servers and processes: nothing below applies
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_bridge

        return bench_bridge.main(quick=args.quick, as_json=args.json, repeat=args.repeat, scale=args.events_scale)

    namespace = f"bench-{os.getpid()}"
    os.environ["SHMFEED_NAMESPACE"] = namespace  # before anything of shmfeed is created
    import shmfeed  # noqa: F401
    from shmfeed import _gc

    started = time.monotonic()
    scale = args.events_scale * (0.1 if args.quick else 1.0)
    sub_counts = [int(s) for s in args.subs.split(",") if s]
    notes: list[str] = []
    transports: list[type[Transport]] = []
    wanted = {t.strip() for t in args.transports.split(",") if t.strip()}
    for tcls in TRANSPORTS:
        if wanted and tcls.name not in wanted and tcls.name != BASELINE:
            continue
        ok, why = tcls.available()
        if ok:
            transports.append(tcls)
        else:
            notes.append(f"{tcls.name}: {why}")

    doc: dict[str, Any] = {
        "meta": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "start_method": CTX.get_start_method(),
            "namespace": namespace,
            "events_scale": scale,
            "repeat": args.repeat,
            "transports": {t.name: t.note for t in transports},
            "kinds": {t.name: _kind(t) for t in transports},
        },
        "throughput": [],
        "reference": [],  # not transports: e.g. one plain memcpy of a raw workload's event
        "harness": [],  # per workload: the harness's own CPU per event (bench_runner.run_harness_cost)
        "latency": [],
        "notes": notes,
    }
    spinners: list[mp.process.BaseProcess] = []
    ok = True
    try:
        if args.monitor_cost:
            result = run_monitor_cost(scale)
            print(json.dumps(result, indent=2))
            return 0 if "error" not in result else 1
        for wl in workloads(scale):
            if args.only and wl.name not in args.only.split(","):
                continue
            if not isinstance(wl, RawWorkload):  # (a raw workload's sender copies into the transport's memory)
                harness = [run_harness_cost(wl) for _ in range(args.repeat)]
                failed = [h for h in harness if "error" in h]
                doc["harness"].append(failed[0] if failed else {
                    "workload": wl.name,
                    **{key: statistics.median(h[key] for h in harness)
                       for key in ("tx_cpu_us_per_event", "rx_cpu_us_per_event")}})
                ok &= not failed
            for n_subs in sub_counts:
                movers = [tcls for tcls in transports if _moves(tcls, wl)]
                runs: dict[str, list[dict]] = {tcls.name: [] for tcls in movers}
                references: dict[int, list[dict]] = {buffers: [] for buffers in MEMCPY_BUFFERS}
                for round_ in range(args.repeat):
                    for buffers in MEMCPY_BUFFERS if isinstance(wl, RawWorkload) else ():  # each round: the same weather
                        ref = dict(run_memcpy_reference(wl, buffers), subs=n_subs)
                        references[buffers].append(ref)
                        if not args.json:
                            status = "ERROR" if "error" in ref else f"{ref['events_per_s']:,.0f} copies/s"
                            print(f"  .. {wl.name} x{n_subs} {ref['reference']} (reference): {status}", file=sys.stderr)
                    # Round robin, starting one further each round: no transport always
                    # runs first (on a fresh machine) or right after the heaviest one.
                    shift = round_ % len(movers)
                    for tcls in movers[shift:] + movers[:shift]:
                        cell = run_cell(tcls, wl, n_subs)
                        runs[tcls.name].append(cell)
                        if not args.json:
                            status = "ERROR" if "error" in cell else f"{cell['events_per_s']:,.0f} ev/s"
                            print(f"  .. {wl.name} x{n_subs} {tcls.name}: {status}", file=sys.stderr)
                for tcls in movers:
                    cell = median_cell(runs[tcls.name])
                    doc["throughput"].append(cell)
                    ok &= "error" not in cell
                for runs_of_one in references.values():
                    if runs_of_one:
                        reference = median_cell(runs_of_one)
                        doc["reference"].append(reference)
                        ok &= "error" not in reference
        n_pp = max(100, int(5000 * (0.2 if args.quick else 1.0)))
        for load in ("idle", "busy (2x nice-19 spin)"):
            if load != "idle":
                spinners = [_start(_spin, index) for index in range(2)]
                time.sleep(0.2)
            pingers = [tcls for tcls in transports if getattr(tcls, "latency", True)]
            pp_runs: dict[str, list[dict]] = {tcls.name: [] for tcls in pingers}
            for round_ in range(args.repeat):  # interleaved like the cells, same rotation
                shift = round_ % len(pingers)
                for tcls in pingers[shift:] + pingers[:shift]:
                    pp_runs[tcls.name].append(run_pingpong(tcls, n_pp, load))
            for tcls in pingers:
                r = median_latency(pp_runs[tcls.name])
                doc["latency"].append(r)
                ok &= "error" not in r
            for p in spinners:
                p.terminate()
            for p in spinners:
                p.join(5)
            spinners = []
    except KeyboardInterrupt:
        notes.append("interrupted")
        ok = False
    finally:
        for p in spinners:
            p.terminate()
        _stop_all_children()
        gc.collect()
        left = _gc.namespace_entries(namespace)
        removed = _gc.sweep(namespace).all()
        if removed:
            notes.append(f"WARNING: sweep removed {len(removed)} leftover(s) in /dev/shm: {removed[:5]}")
        still = _gc.namespace_entries(namespace)
        if left and not removed:
            notes.append(f"WARNING: {len(left)} entr(ies) of the namespace in /dev/shm at exit: {left[:5]}")
        if still:
            notes.append(f"WARNING: {len(still)} entr(ies) still in /dev/shm after sweep: {still[:5]}")
            ok = False
        try:
            ring_left = [e for e in os.listdir("/dev/shm") if e.startswith((f"plainring-{os.getpid()}-", f"sem.plainring-{os.getpid()}-"))]
        except OSError:
            ring_left = []
        if ring_left:
            notes.append(f"WARNING: plain ring left {len(ring_left)} entr(ies) in /dev/shm: {ring_left[:5]}")
            ok = False
        iceoryx2_left = sorted(_iceoryx2_entries())
        for entry in iceoryx2_left:  # the peer's: its node files outlive the processes that made them
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", entry))
        if iceoryx2_left:
            notes.append(f"iceoryx2 left {len(iceoryx2_left)} entr(ies) in /dev/shm (removed): {iceoryx2_left[:3]}")

    doc["summary"] = summarize(doc)
    if args.png:
        problem = draw_png(doc, args.png)
        notes.append(problem or f"chart written to {args.png}")
    doc["ok"] = bool(ok)
    doc["meta"]["wall_seconds"] = time.monotonic() - started
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_tables(doc)
    return 0 if ok else 1


def _moves(tcls: type[Transport], wl: Workload) -> bool:
    """Whether ``tcls`` runs the throughput cells of ``wl`` (a variant may name its workloads)."""
    if not getattr(tcls, "throughput", True):
        return False
    only = getattr(tcls, "only_workloads", None)
    return only is None or wl.name in only


if __name__ == "__main__":
    sys.exit(main())
