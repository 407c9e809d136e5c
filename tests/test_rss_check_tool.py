"""The receiver-memory check (``tools/rss_check.py``, issue 7) runs, checks its values and cleans up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "rss_check.py")


@pytest.mark.timeout(120)
def test_a_short_rss_check_passes(namespace: str) -> None:
    # Short: the warm-up is not over, so a generous slack; the tool's point is the long run.
    run = subprocess.run([sys.executable, TOOL, "--values", "1200", "--slack", "16"], capture_output=True,
                         text=True, timeout=100, env=dict(os.environ, SHMFEED_NAMESPACE=namespace))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1,200 values, 0 wrong" in run.stdout and "0 entries of its namespace left" in run.stdout
    assert run.stdout.count("RssAnon") == 12 + 1
