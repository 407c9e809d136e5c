"""``tools/bench.py``'s harness: the sender, receiver and ping-pong processes, one cell run
(``run_cell``), its median over interleaved runs, the ping-pong run and the monitor-cost
run."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue as queue_mod
import statistics
import time
import traceback
from typing import Any, Callable

from bench_transports import CELL_TIMEOUT_S, CTX, READY_TIMEOUT_S, ShmfeedTransport, Transport, Workload, workloads

# --------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------


def _produce(send: Callable[[Any], None], wl: Workload, builds_values: bool) -> None:
    """The sender's loop: every event of ``wl``, made here (or by the transport), sent."""
    make = wl.make
    if builds_values:
        for i in range(wl.events):
            send(i)
    else:
        for i in range(wl.events):
            send(make(i))


def _consume(it: Any, wl: Workload, i: int) -> tuple[int, str | None, int]:
    """A receiver's loop: every event from ``it`` checked in order; (how many came, the
    first problem, when the last one came)."""
    check = wl.check
    expected = 0
    error = None
    t_last = 0
    for v in it:
        if error is None:
            problem = check(v, expected)
            if problem:
                error = f"receiver {i}: {problem}"
        expected += 1
        if expected == wl.events:
            t_last = time.monotonic_ns()
    return expected, error, t_last


def _harness_main(wl: Workload, results) -> None:
    """The harness's own CPU per event, with no transport: the sender's loop into a send
    that does nothing, and a receiver's loop over the events made beforehand."""
    try:
        wl.prepare_process()
        cpu0 = time.process_time()
        _produce(lambda value: None, wl, False)
        cpu1 = time.process_time()
        events = [wl.make(i) for i in range(wl.events)]
        cpu2 = time.process_time()
        count, error, _ = _consume(iter(events), wl, 0)
        cpu3 = time.process_time()
        if error or count != wl.events:
            raise RuntimeError(f"harness: {error or count}")
        results.put(("result", "harness", 0, {"tx": cpu1 - cpu0, "rx": cpu3 - cpu2}))
    except BaseException:  # noqa: BLE001
        results.put(("error", "harness", 0, traceback.format_exc()))


def run_harness_cost(wl: Workload) -> dict:
    """CPU µs per event that the harness itself spends (making each event in the sender,
    checking it in each receiver), in a fresh process: part of every transport's tx and
    rx figures alike, shown so that a transport's own share can be told."""
    out: dict[str, Any] = {"workload": wl.name}
    got = _one_process_result(_harness_main, (wl,), "the harness reference", out)
    if got is not None:
        out.update(tx_cpu_us_per_event=got["tx"] / wl.events * 1e6, rx_cpu_us_per_event=got["rx"] / wl.events * 1e6)
    return out


def _one_process_result(target: Callable[..., None], args: tuple, what: str, out: dict) -> Any:
    """Run ``target(*args, results)`` in a fresh process and return what it reported; None,
    with ``out["error"]`` set, if it failed or did not finish in time."""
    results = CTX.Queue()
    procs = []
    try:
        procs = [_start(target, *args, results)]
        msgs = _collect(results, 1, time.monotonic() + CELL_TIMEOUT_S)
        if not msgs:
            out["error"] = f"HANG: {what} did not finish"
        elif msgs[0][0] == "error":
            out["error"] = msgs[0][3]
        else:
            return msgs[0][3]
        return None
    finally:
        _finish(procs, results, lambda: None, out)


def _sender_main(transport: Transport, wl: Workload, results, go, done) -> None:
    try:
        wl.prepare_process()
        send, finish = transport.sender()
        transport.sender_ready()
        results.put(("ready", "tx", 0, None))
        if not go.wait(READY_TIMEOUT_S * 2):
            return
        cpu0 = time.process_time()
        t0 = time.monotonic_ns()
        _produce(send, wl, transport.builds_values)
        t_sent = time.monotonic_ns()
        finish()
        results.put(("result", "tx", 0, {"t0": t0, "t_sent": t_sent}))
        done.wait(CELL_TIMEOUT_S)  # every receiver has everything: the sender's work is over
        cpu1 = time.process_time()
        results.put(("cpu", "tx", 0, cpu1 - cpu0))
        transport.sender_close()
    except BaseException:  # noqa: BLE001
        results.put(("error", "tx", 0, traceback.format_exc()))


def _receiver_main(transport: Transport, i: int, wl: Workload, results) -> None:
    try:
        wl.prepare_process()
        it = transport.receiver(i)
        results.put(("ready", "rx", i, None))
        cpu0 = time.process_time()
        expected, error, t_last = _consume(it, wl, i)
        cpu1 = time.process_time()
        if error is None and expected != wl.events:
            error = f"receiver {i}: got {expected} events, expected {wl.events}"
        results.put(("result", "rx", i, {"count": expected, "t_end": t_last, "cpu": cpu1 - cpu0, "error": error}))
    except BaseException:  # noqa: BLE001
        results.put(("error", "rx", i, traceback.format_exc()))


def _pp_main(transport: Transport, side: int, n: int, warmup: int, results, pin: bool) -> None:
    try:
        if pin:
            _pin(side)
        send, recv = transport.pp_endpoint(side)
        if side == 1:
            while True:
                v = recv()
                send(v)
                if v is None:
                    return
        samples = []
        for i in range(warmup + n):
            v = {"seq": i, "price": 1.5}
            t = time.perf_counter_ns()
            send(v)
            back = recv()
            dt = time.perf_counter_ns() - t
            if back != v:
                raise RuntimeError(f"ping-pong: sent {v!r}, got back {back!r}")
            if i >= warmup:
                samples.append(dt)
        send(None)
        recv()
        results.put(("result", "pp", 0, samples))
    except BaseException:  # noqa: BLE001
        results.put(("error", "pp", side, traceback.format_exc()))


def _pin(index: int) -> None:
    """Run on CPU ``index`` (modulo the CPUs we may use): the two ends of a ping-pong on
    two different CPUs every time, so that each transport is measured in the same regime
    (two ends sharing a CPU hand over without an inter-processor wake-up, and the
    scheduler picks one or the other at random from run to run)."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[index % len(cpus)]})


def _spin(index: int) -> None:
    _pin(index)
    os.nice(19)
    while True:
        pass


# --------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------

_children: list[mp.process.BaseProcess] = []


def _start(target, *args) -> mp.process.BaseProcess:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    _children.append(p)
    return p


def _stop_all_children() -> None:
    for p in _children:
        if p.is_alive():
            p.terminate()
    for p in _children:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
    _children.clear()


def _collect(results, want: int, deadline: float) -> list[tuple]:
    out = []
    while len(out) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            out.append(results.get(timeout=min(left, 1.0)))
        except queue_mod.Empty:
            continue
    return out


def _finish(procs: list, results: Any, teardown: Callable[[], None], record: dict) -> None:
    """Join (or terminate) a measurement's processes, then tear its transport down."""
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p in _children:
            _children.remove(p)
    results.close()
    try:
        teardown()
    except Exception as exc:  # noqa: BLE001
        record.setdefault("error", f"teardown: {exc!r}")


def run_cell(tcls: type[Transport], wl: Workload, n_subs: int) -> dict:
    transport = tcls()
    transport.setup(n_subs, wl)
    results = CTX.Queue()
    go, done = CTX.Event(), CTX.Event()
    procs = []
    cell: dict[str, Any] = {"transport": tcls.name, "workload": wl.name, "subs": n_subs, "events": wl.events}
    try:
        procs = [_start(_receiver_main, transport, i, wl, results) for i in range(n_subs)]
        procs.append(_start(_sender_main, transport, wl, results, go, done))
        ready = _collect(results, n_subs + 1, time.monotonic() + READY_TIMEOUT_S)
        errors = [m[3] for m in ready if m[0] == "error"]
        if errors or len(ready) < n_subs + 1:
            cell["error"] = "; ".join(errors) or f"only {len(ready)} of {n_subs + 1} processes became ready"
            return cell
        go.set()
        msgs = _collect(results, n_subs + 1, time.monotonic() + CELL_TIMEOUT_S)
        done.set()
        cpu_msg = _collect(results, 1, time.monotonic() + 10.0)
        msgs += [m for m in cpu_msg if m[0] == "error"]
        errors = [f"{m[1]}{m[2]}: {m[3]}" for m in msgs if m[0] == "error"]
        errors += [m[3]["error"] for m in msgs if m[0] == "result" and m[1] == "rx" and m[3]["error"]]
        if len(msgs) < n_subs + 1:
            finished = {(m[1], m[2]) for m in msgs}
            missing = [f"{r}{i}" for r, i in [("tx", 0)] + [("rx", i) for i in range(n_subs)] if (r, i) not in finished]
            errors.append(f"HANG: {', '.join(missing)} did not finish within {CELL_TIMEOUT_S:.0f} s")
        elif not cpu_msg or cpu_msg[0][0] != "cpu":
            errors.append("sender did not report its CPU time")
        if errors:
            cell["error"] = "; ".join(errors)
            return cell
        tx = dict(next(m[3] for m in msgs if m[1] == "tx"), cpu=cpu_msg[0][3])
        rxs = [m[3] for m in msgs if m[1] == "rx"]
        elapsed = (max(r["t_end"] for r in rxs) - tx["t0"]) / 1e9
        cell.update(
            seconds=elapsed,
            events_per_s=wl.events / elapsed,
            mb_per_s=wl.events * wl.encoded_size() / elapsed / 1e6,
            tx_cpu_us_per_event=tx["cpu"] / wl.events * 1e6,
            rx_cpu_us_per_event=statistics.mean(r["cpu"] for r in rxs) / wl.events * 1e6,  # mean per receiver
            rx_counts=[r["count"] for r in rxs],
        )
        return cell
    finally:
        done.set()
        _finish(procs, results, transport.teardown, cell)
        del transport
        gc.collect()


def median_cell(runs: list[dict]) -> dict:
    """One transport's result for a cell from its repeated runs: the run of median
    throughput (the lower middle one for an even count), or the first failed run, since a
    single loss or hang fails the cell. Every run's events/s is kept in ``runs_events_per_s``."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda run: run["events_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["runs_events_per_s"] = [run["events_per_s"] for run in runs]
    return chosen


def median_latency(runs: list[dict]) -> dict:
    """One transport's ping-pong result from its repeated runs: each percentile the median
    of the runs' (the lower middle one for an even count), or the first failed run. A tail
    percentile of one run is decided by a handful of samples, so one scheduler hiccup moves
    it tenfold; the median of interleaved runs is what the table shows, with every run's
    p99.9 kept in ``runs_p999_us``."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    chosen = dict(runs[0])
    for key in ("p50_us", "p99_us", "p999_us", "max_us"):
        chosen[key] = sorted(run[key] for run in runs)[(len(runs) - 1) // 2]
    chosen["runs_p999_us"] = [run["p999_us"] for run in runs]
    return chosen


MEMCPY_BUFFERS = (1, 16)  # buffer pairs a memcpy reference cycles through: cache-hot, and not


def _memcpy_main(nbytes: int, buffers: int, min_seconds: float, results) -> None:
    """Copy a preallocated ``nbytes`` buffer into another, over and over, for at least
    ``min_seconds``, cycling through ``buffers`` pairs of them (1: both stay in the CPU's
    caches; 16 pairs of 1 MiB: 32 MiB, more than the caches hold, as a stream of distinct
    values is); report the copies and the time they took."""
    try:
        # every buffer touched: no page faults timed
        pairs = [(memoryview(bytearray(b"\x5a" * nbytes)), memoryview(bytearray(b"\x00" * nbytes)))
                 for _ in range(buffers)]
        for _ in range(2):  # warm up (caches, TLB)
            for src, dst in pairs:
                dst[:] = src
        copies, batch = 0, 64
        t0 = time.monotonic_ns()
        while True:
            for i in range(batch):
                src, dst = pairs[i % buffers]
                dst[:] = src  # one memcpy of nbytes
            copies += batch
            elapsed = time.monotonic_ns() - t0
            if elapsed >= min_seconds * 1e9:
                break
        results.put(("result", "memcpy", 0, {"copies": copies, "seconds": elapsed / 1e9}))
    except BaseException:  # noqa: BLE001
        results.put(("error", "memcpy", 0, traceback.format_exc()))


def run_memcpy_reference(wl: Workload, buffers: int = 1, min_seconds: float = 0.5) -> dict:
    """The reference for a raw workload: events/s of ONE plain copy of an event's bytes
    into a preallocated buffer, in one fresh process (as the benchmark's workers are),
    cycling through ``buffers`` pairs of buffers (see ``_memcpy_main``)."""
    label = f"memcpy {_size_label(wl.blob_len)}"
    if buffers > 1:
        label += f", {_size_label(2 * buffers * wl.blob_len)} of buffers"
    out: dict[str, Any] = {"reference": label, "workload": wl.name, "bytes": wl.blob_len, "buffers": buffers}
    got = _one_process_result(_memcpy_main, (wl.blob_len, buffers, min_seconds), "the memcpy reference", out)
    if got is not None:
        copies, seconds = got["copies"], got["seconds"]
        out.update(copies=copies, seconds=seconds, events_per_s=copies / seconds,
                   mb_per_s=copies * wl.blob_len / seconds / 1e6)
    return out


def _size_label(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes % (1 << 20) == 0 else f"{nbytes} B"


def run_pingpong(tcls: type[Transport], n: int, load: str) -> dict:
    transport = tcls()
    transport.pp_setup()
    results = CTX.Queue()
    out: dict[str, Any] = {"transport": tcls.name, "load": load, "round_trips": n}
    procs = []
    try:
        pin = load != "idle"  # idle: as is; busy: each end on its own CPU (see _pin)
        procs = [_start(_pp_main, transport, 1, n, 0, results, pin),
                 _start(_pp_main, transport, 0, n, 200, results, pin)]
        msgs = _collect(results, 1, time.monotonic() + CELL_TIMEOUT_S)
        if not msgs:
            out["error"] = "HANG: ping-pong did not finish"
            return out
        if msgs[0][0] == "error":
            out["error"] = msgs[0][3]
            return out
        samples = sorted(msgs[0][3])

        def pct(q: float) -> float:
            return samples[min(len(samples) - 1, int(q * len(samples)))] / 2 / 1000  # one-way µs

        out.update(p50_us=pct(0.50), p99_us=pct(0.99), p999_us=pct(0.999), max_us=samples[-1] / 2 / 1000)
        return out
    finally:
        _finish(procs, results, transport.pp_teardown, out)
        del transport
        gc.collect()


def _monitor_loop(namespace: str, interval: float) -> None:
    """What `shmfeed monitor --interval S` does each refresh: snapshot, rates, render."""
    from shmfeed import _monitor

    previous = None
    while True:
        previous = _monitor.collect(namespace, previous)
        _monitor.render_text(previous)
        time.sleep(interval)


def run_monitor_cost(scale: float, rounds: int = 3) -> dict:
    """Small-event fan-out to 4 subscribers, alternately without and with a monitor."""
    wl = next(w for w in workloads(scale) if w.name == "small")
    rates: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(rounds):
        for mode in ("without", "with"):
            watcher = _start(_monitor_loop, os.environ["SHMFEED_NAMESPACE"], 0.5) if mode == "with" else None
            try:
                cell = run_cell(ShmfeedTransport, wl, 4)
            finally:
                if watcher is not None:
                    watcher.terminate()
                    watcher.join(5)
                    _children.remove(watcher)
            if "error" in cell:
                return {"error": cell["error"]}
            rates[mode].append(cell["events_per_s"])
    without, with_ = statistics.median(rates["without"]), statistics.median(rates["with"])
    return {"without_ev_s": rates["without"], "with_ev_s": rates["with"],
            "slowdown_pct": round(100 * (without - with_) / without, 1)}


