"""Run the kill scenarios once each, outside pytest, and print what they measured.

    python tools/killmatrix.py [--start-method fork|spawn|forkserver]

Each scenario (the drivers in ``tests/_kill_workers.py``, the same code the tests run) gets
a fresh namespace. The table shows, per scenario: the time from the SIGKILL until the
survivors went on (scenario 6: until nothing of the namespace was left in /dev/shm), the
values lost and duplicated among survivors, and what was left in /dev/shm after cleanup.
Exits non-zero on any violation (a bound exceeded, a value lost or duplicated beyond what
the scenario allows, a leftover, or a failed check).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import traceback
import uuid

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path.insert(0, TESTS)

import _kill_workers as K  # noqa: E402

from shmfeed import _gc, _release  # noqa: E402


def run_one(scenario, start_method: str) -> tuple[K.Outcome | None, str | None]:
    namespace = f"killmatrix-{uuid.uuid4().hex[:12]}"
    os.environ["SHMFEED_NAMESPACE"] = namespace
    os.environ["SHMFEED_REGISTRY_IDLE"] = "0.5"
    if start_method == "forkserver":
        from multiprocessing import forkserver

        forkserver._forkserver._stop()  # its children must see this namespace
    ctx = multiprocessing.get_context(start_method)
    try:
        return scenario(ctx, namespace), None
    except BaseException:  # noqa: BLE001 - reported in the table
        return None, traceback.format_exc()
    finally:
        _release.release_namespace(namespace)
        if _gc.namespace_entries(namespace):
            _gc.sweep(namespace)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-method", default="fork", choices=["fork", "spawn", "forkserver"])
    args = parser.parse_args()
    rows, failures = [], 0
    for scenario in K.SCENARIOS:
        outcome, error = run_one(scenario, args.start_method)
        if outcome is None:
            failures += 1
            name = getattr(scenario, "__name__", None) or scenario.func.__name__
            rows.append((name, "FAILED", "-", "-", "-", "check failed"))
            print(error, file=sys.stderr)
            continue
        problems = outcome.violations()
        failures += bool(problems)
        lost = f"{outcome.lost}" + (f" (<= {outcome.allowed_lost} ok)" if outcome.allowed_lost else "")
        rows.append((outcome.scenario, f"{outcome.proceed_s * 1000:.0f}", lost, str(outcome.duplicated),
                     str(len(outcome.left)), "; ".join(problems) or "ok"))
        if outcome.notes:
            print(f"  {outcome.scenario}: {outcome.notes}", file=sys.stderr)
    header = ("scenario", "proceed ms", "lost", "dup", "shm left", "verdict")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    print(f"start method: {args.start_method}")
    for row in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
