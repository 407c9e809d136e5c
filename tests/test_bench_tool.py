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
def test_a_tiny_bench_run_is_lossless_and_leaves_nothing(namespace: str) -> None:
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
    assert not [n for n in doc["notes"] if "WARNING" in n], doc["notes"]
