"""The short CI version of the soak and chaos run (``tools/soak.py``, issue 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SOAK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "soak.py")


@pytest.mark.timeout(180)
def test_short_soak_with_chaos(namespace: str) -> None:
    env = dict(os.environ, SHMFEED_NAMESPACE=namespace)
    result = subprocess.run([sys.executable, SOAK, "--minutes", "0.25", "--seed", "20240607", "--json"],
                            capture_output=True, text=True, timeout=150, env=env)
    assert result.stdout, f"no report; stderr:\n{result.stderr[-4000:]}"
    report = json.loads(result.stdout)
    summary = json.dumps({k: report.get(k) for k in ("kills", "recovery", "violation_counts", "violations",
                                                      "dev_shm", "totals")}, indent=1)
    assert result.returncode == 0, f"soak failed:\n{summary}\nstderr:\n{result.stderr[-4000:]}"
    assert report["namespace"] == namespace
    assert report["ok"] and report["violation_count"] == 0, summary
    assert all(report["violation_counts"][kind] == 0 for kind in report["violation_counts"]), summary
    for kind in ("subscriber", "sender", "registry"):
        assert report["kills"][kind] > 0, f"no {kind} was killed: {summary}"
        assert report["recovery"][kind]["count"] == report["kills"][kind], summary
    totals = report["totals"]
    assert totals["feed_sends"] > 0 and totals["values_received"] > 0 and totals["queue_received"] > 0, summary
    assert totals["large_values_received"] > 0, summary
    assert report["dev_shm"]["left"] == [], summary
    # 1 MiB values went inline through the 8 MiB ring and as spill files through the others.
    subs = report["subscribers"]
    assert subs["sub1"]["large"] > 0 and subs["sub1"]["spilled"] == 0, subs
    assert any(s["spilled"] > 0 for s in subs.values()), subs
