"""Exit while a daemon thread is blocked inside shmfeed: the interpreter must exit cleanly.

A daemon consumer thread is the most common way to read a channel in the background; at
interpreter exit it is still asleep inside the library. This runs a small program, once
per blocked call and ``--runs`` times each, that starts such a thread, waits until it
sleeps (handshake through a pipe, then the wait list) and lets the interpreter exit. Every
run must end with status 0 and leave nothing of its namespace in /dev/shm.

    python tools/exit_check.py --runs 200          # every blocked call, 200 runs each
    python tools/exit_check.py --runs 5 --call recv

Prints one line per call and ``result: OK`` (exit status 0) or ``result: FAIL`` (1).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid

CALLS = ("send", "recv", "select", "err_recv", "recv_async", "feed_send", "iterate_sub")

# The program each run executes: argv[1] names the blocked call. The main thread returns
# soon after the daemon thread is registered as a waiter on the channel it blocks on.
PROGRAM = r'''
import asyncio, atexit, sys, threading, time
# Registered before shmfeed's own hook, so it runs after it (atexit is last in, first
# out): the exit then lasts longer than the waiters' 0.25 s watchdog, and a sleeping
# thread wakes up after the library let go of everything, as in a slow real exit.
atexit.register(time.sleep, 0.4)
import shmfeed
call = sys.argv[1]
ch = shmfeed.Channel(capacity=1)
feed = shmfeed.Feed()
started = threading.Event()
if call == "send":
    ch.send(0)
    target = lambda: ch.send(1)
elif call == "recv":
    target = ch.recv
elif call == "select":
    other = shmfeed.Channel(capacity=1)
    target = lambda: shmfeed.select(ch, other)
elif call == "err_recv":
    sub = feed.subscribe(ch)
    target = lambda: sub.err().recv()
elif call == "recv_async":
    target = lambda: asyncio.run(ch.recv_async())
elif call == "feed_send":
    sub = feed.subscribe(ch)
    feed.send(0)
    target = lambda: feed.send(1)
elif call == "iterate_sub":
    sub = feed.subscribe(ch)
    target = lambda: [v for v in sub]
def run():
    started.set()
    target()
threading.Thread(target=run, daemon=True).start()
started.wait()
stats = sub.err().channel.statistics if call == "err_recv" else ch.statistics
deadline = time.monotonic() + 5
while time.monotonic() < deadline:  # until the thread sleeps (where there is a counter)
    s = stats()
    if s.waiting_senders or s.waiting_receivers:
        break
    time.sleep(0.005)
time.sleep(0.1)
'''


def run_once(call: str, timeout: float = 30.0) -> tuple[int, str, list[str]]:
    """Run the program once; (exit status, stderr, what it left in /dev/shm)."""
    from shmfeed import _gc

    namespace = f"exit-check-{uuid.uuid4().hex[:12]}"
    env = {**os.environ, "SHMFEED_NAMESPACE": namespace, "SHMFEED_REGISTRY_IDLE": "0.5"}
    done = subprocess.run([sys.executable, "-c", PROGRAM, call], env=env, capture_output=True,
                          text=True, timeout=timeout)
    left: list[str] = []
    deadline = time.monotonic() + 5  # the registry cleans up after a process that died
    while time.monotonic() < deadline:
        left = _gc.namespace_entries(namespace)
        if not left:
            break
        time.sleep(0.05)
    if left:
        _gc.sweep(namespace)
    return done.returncode, done.stderr, left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="runs per blocked call")
    parser.add_argument("--call", choices=CALLS, action="append", help="only these calls (repeatable)")
    args = parser.parse_args(argv)
    failed = False
    for call in args.call or CALLS:
        statuses: dict[int, int] = {}
        leaks = 0
        first_error = ""
        for _ in range(args.runs):
            status, stderr, left = run_once(call)
            statuses[status] = statuses.get(status, 0) + 1
            leaks += bool(left)
            if (status or left) and not first_error:
                first_error = (stderr.strip().splitlines() or [""])[-1] + (f" left {left}" if left else "")
        bad = args.runs - statuses.get(0, 0)
        failed |= bool(bad or leaks)
        print(f"{call:12} runs {args.runs}  exit statuses {dict(sorted(statuses.items()))}  "
              f"crashes/errors {bad}  leaks {leaks}" + (f"  first: {first_error}" if first_error else ""),
              flush=True)
    print("result:", "FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
