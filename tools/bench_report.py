"""``tools/bench.py``'s report: the summary with ratios, the tables, the chart."""

from __future__ import annotations

from typing import Any

from bench_transports import BASELINE, Transport

# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def _cell_keys(cells: list[dict]) -> list[tuple[str, int]]:
    keys: list[tuple[str, int]] = []
    for c in cells:
        k = (c["workload"], c["subs"])
        if k not in keys:
            keys.append(k)
    return keys


def summarize(doc: dict) -> list[dict]:
    """Per cell: shmfeed vs. the fastest lossless peer (the floor is not a peer) and vs. the
    floor; where they ran, each shmfeed variant vs. that peer and vs. the cell's reference."""
    kinds = doc["meta"]["kinds"]
    out = []
    cells = doc["throughput"]
    references = _references_by_cell(doc, with_errors=False)
    for k in _cell_keys(cells):
        group = [c for c in cells if (c["workload"], c["subs"]) == k and "error" not in c]
        base = next((c for c in group if c["transport"] == BASELINE), None)
        peers = [c for c in group if kinds.get(c["transport"]) == "peer"]
        best = max(peers, key=lambda c: c["events_per_s"], default=None)
        floor = next((c for c in group if kinds.get(c["transport"]) == "floor"), None)
        row: dict[str, Any] = {"workload": k[0], "subs": k[1]}
        if base is not None and best is not None:
            row.update(best_peer=best["transport"], shmfeed_vs_best_peer=base["events_per_s"] / best["events_per_s"])
        if base is not None and floor is not None:
            row.update(shmfeed_vs_floor=base["events_per_s"] / floor["events_per_s"])
        variants = [c for c in group if kinds.get(c["transport"]) == "variant"]
        if variants:
            row["variants"] = [_variant_ratios(c, best, references.get(k, [])) for c in variants]
        harness = next((h for h in doc.get("harness", []) if h["workload"] == k[0] and "error" not in h), None)
        ours = [c for c in [base] + variants if c is not None]
        if harness is not None and ours:
            row["cpu_us_per_event"] = {c["transport"]: _cpu_per_event(c, k[1]) for c in ours}
            row["harness_cpu_us_per_event"] = _cpu_per_event(harness, k[1])
        out.append(row)
    return out


def _cpu_per_event(figures: dict, subs: int) -> float:
    """CPU µs one event costs in all: the sender's plus each of ``subs`` receivers'."""
    return figures["tx_cpu_us_per_event"] + subs * figures["rx_cpu_us_per_event"]


def _references_by_cell(doc: dict, with_errors: bool = True) -> dict[tuple[str, int], list[dict]]:
    found: dict[tuple[str, int], list[dict]] = {}
    for r in doc.get("reference", []):
        if with_errors or "error" not in r:
            found.setdefault((r["workload"], r["subs"]), []).append(r)
    return found


def _variant_ratios(cell: dict, best_peer: dict | None, references: list[dict]) -> dict[str, Any]:
    """A shmfeed variant's rate divided by the best peer's and by each reference's (one
    plain memcpy of the event's bytes, cache-hot, and over more buffers than the caches
    hold): > 1 means the variant is faster. ``vs_reference`` is the first (cache-hot)."""
    row: dict[str, Any] = {"transport": cell["transport"]}
    if best_peer is not None:
        row.update(best_peer=best_peer["transport"], vs_best_peer=cell["events_per_s"] / best_peer["events_per_s"])
    if references:
        ratios = [{"reference": r["reference"], "ratio": cell["events_per_s"] / r["events_per_s"]} for r in references]
        row.update(reference=ratios[0]["reference"], vs_reference=ratios[0]["ratio"], vs_references=ratios)
    return row


def _print_reference(reference: dict | None) -> None:
    if reference is None:
        return
    lead = f"{reference['workload']:8s} {reference['subs']:>4d} {'':>7s}"
    label = f"{reference['reference']} (ref)"
    if "error" in reference:
        print(f"{lead}  {label:24s} ERROR: {reference['error'].strip().splitlines()[-1][:100]}")
        return
    print(f"{lead}  {label:24s} {_fmt_rate(reference['events_per_s']):>12s} {reference['mb_per_s']:>8.1f}"
          f"   one copy in one process, {reference['copies']:,} copies in {reference['seconds']:.2f} s")


def _variant_line(variant: dict) -> str:
    parts = []
    if "vs_best_peer" in variant:
        parts.append(f"{variant['transport']} / best peer ({variant['best_peer']}) = {variant['vs_best_peer']:.2f}x")
    for ratio in variant.get("vs_references", []):
        parts.append(f"{variant['transport']} / {ratio['reference']} = {ratio['ratio']:.2f}x")
    return ";  ".join(parts)


def print_tables(doc: dict) -> None:
    m = doc["meta"]
    print(
        f"shmfeed bench  python {m['python']}  {m['cpus']} CPUs  start={m['start_method']}  "
        f"namespace={m['namespace']}  scale={m['events_scale']}"
    )
    for name, note in m["transports"].items():
        print(f"  {name:11s} {note}")
    print()
    print("Throughput: lossless fan-out, 1 sender -> N receiver processes, every event checked in order.")
    print(f"  Each cell: the median of {m.get('repeat', 1)} runs per transport, interleaved (this machine is shared and noisy).")
    print("  CPU µs/ev: tx = sender process, rx = mean per receiver process.")
    print("  vs shmfeed = shmfeed ev/s / this ev/s (> 1: shmfeed is faster). (floor) = not a peer, see notes; (var) = shmfeed received another way.")
    if doc.get("reference"):
        print("  (ref) = not a transport: one plain copy of an event's bytes into a preallocated buffer, in one process.")
    hdr = (f"{'workload':8s} {'subs':>4s} {'events':>7s}  {'transport':24s} {'events/s':>12s} {'MB/s':>8s} "
           f"{'tx µs/ev':>9s} {'rx µs/ev':>9s} {'vs shmfeed':>10s}")
    print(hdr)
    print("-" * len(hdr))
    cells = doc["throughput"]
    summaries = {(r["workload"], r["subs"]): r for r in doc.get("summary", [])}
    references = _references_by_cell(doc)
    for k in _cell_keys(cells):
        group = [c for c in cells if (c["workload"], c["subs"]) == k]
        base = next((c for c in group if c["transport"] == BASELINE and "error" not in c), None)
        for c in group:
            lead = f"{c['workload']:8s} {c['subs']:>4d} {c['events']:>7d}"
            label = c["transport"] + {"floor": " (floor)", "variant": " (var)"}.get(m["kinds"].get(c["transport"]), "")
            if "error" in c:
                print(f"{lead}  {label:24s} ERROR: {c['error'].strip().splitlines()[-1][:100]}")
                continue
            ratio = "" if base is None or c is base else f"{base['events_per_s'] / c['events_per_s']:.2f}x"
            print(
                f"{lead}  {label:24s} {_fmt_rate(c['events_per_s']):>12s} {c['mb_per_s']:>8.1f} "
                f"{c['tx_cpu_us_per_event']:>9.1f} {c['rx_cpu_us_per_event']:>9.1f} {ratio:>10s}"
            )
        for reference in references.get(k, []):
            _print_reference(reference)
        r = summaries.get(k, {})
        parts = []
        if "shmfeed_vs_best_peer" in r:
            parts.append(f"shmfeed / best peer ({r['best_peer']}) = {r['shmfeed_vs_best_peer']:.2f}x")
        if "shmfeed_vs_floor" in r:
            parts.append(f"shmfeed / plain ring floor = {r['shmfeed_vs_floor']:.2f}x")
        if parts:
            print(f"{'':22s}" + ";  ".join(parts))
        for variant in r.get("variants", []):
            print(f"{'':22s}" + _variant_line(variant))
        if "cpu_us_per_event" in r:
            spent = ", ".join(f"{name} {cpu:.2f} µs" for name, cpu in r["cpu_us_per_event"].items())
            print(f"{'':22s}CPU per event (tx + {k[1]} x rx): {spent}; of each, the harness's own "
                  f"(make, check, loops; no transport): {r['harness_cpu_us_per_event']:.2f} µs")
        print()
    print(f"Latency: ping-pong, small value, one-way = round trip / 2 (µs); each figure the median of {doc['meta'].get('repeat', 1)} interleaved runs")
    hdr = f"{'transport':11s} {'load':22s} {'p50':>8s} {'p99':>8s} {'p99.9':>8s} {'max':>9s}"
    print(hdr)
    print("-" * len(hdr))
    for r in doc["latency"]:
        if "error" in r:
            print(f"{r['transport']:11s} {r['load']:22s} ERROR: {r['error'].strip().splitlines()[-1][:100]}")
            continue
        print(
            f"{r['transport']:11s} {r['load']:22s} {r['p50_us']:>8.1f} {r['p99_us']:>8.1f} {r['p999_us']:>8.1f} {r['max_us']:>9.1f}"
        )
    if doc["notes"]:
        print()
        for note in doc["notes"]:
            print(f"note: {note}")
    print()
    print(f"total {doc['meta']['wall_seconds']:.1f} s; result: {'OK' if doc['ok'] else 'FAILED'}")


def draw_png(doc: dict, path: str) -> str | None:
    """Grouped bars (log scale) of events/s per transport per cell; returns a note on failure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--png {path}: matplotlib not installed: no chart"
    cells = [c for c in doc["throughput"] if "error" not in c]
    keys = _cell_keys(doc["throughput"])
    names = list(doc["meta"]["transports"])
    if not cells or not keys:
        return f"--png {path}: no results to draw"
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(min(16.0, max(8.0, 0.25 * len(keys) * len(names) + 2)), 6))
    for j, name in enumerate(names):
        xs, ys = [], []
        for x, k in enumerate(keys):
            c = next((c for c in cells if (c["workload"], c["subs"]) == k and c["transport"] == name), None)
            if c is not None:
                xs.append(x - 0.4 + width * (j + 0.5))
                ys.append(c["events_per_s"])
        kind = doc["meta"]["kinds"].get(name)
        label = name + (" (floor)" if kind == "floor" else "")
        ax.bar(xs, ys, width, label=label, hatch="//" if kind == "floor" else None,
               edgecolor="black" if name == BASELINE else None, linewidth=1.2 if name == BASELINE else 0)
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{w}\nx{n}" for w, n in keys])
    ax.set_ylabel("events/s (log)")
    ax.set_title("Lossless fan-out, 1 sender -> N receivers (msgpack, in-order checked)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _kind(tcls: type[Transport]) -> str:
    if tcls.name == BASELINE:
        return "baseline"
    if getattr(tcls, "floor", False):
        return "floor"
    if getattr(tcls, "variant_of", None):
        return "variant"
    return "peer" if getattr(tcls, "lossless", True) else "lossy peer"


