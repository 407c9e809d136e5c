"""The README's monitor scene: a slow, labelled reader and a sender blocked on its channel.

A feed "ticks" has two subscribers: ``ticks-logger``, read by a fast reader, and
``ticks-worker-3``, read by a slow one (a value every 2 s). The sender sends 200 values a
second; once ``ticks-worker-3`` is full it waits on it. A fourth process holds
``ticks-worker-3`` without ever reading it (as a forked helper does): the monitor lists it
among the holders in ``--json``, not among the readers. After ``--settle`` seconds this
prints ``shmfeed monitor --once`` of the scene, then ends every process.

    python tools/monitor_scene.py              # the screen, as pasted in the README
    python tools/monitor_scene.py --json       # the same scene as JSON
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
import uuid

import shmfeed


def read(channel: shmfeed.Channel, pause: float, stop: shmfeed.Channel) -> None:
    """Read ``channel``, pausing ``pause`` seconds after each value, until ``stop`` has one."""
    while not len(stop):
        try:
            channel.recv(timeout=0.5)
        except TimeoutError:
            continue
        time.sleep(pause)


def hold(channel: shmfeed.Channel, stop: shmfeed.Channel) -> None:
    """Hold ``channel`` and never read it."""
    stop.recv()


def send(stop: shmfeed.Channel) -> None:
    feed = shmfeed.Feed("ticks")
    value = 0
    while not len(stop):
        try:
            feed.send({"tick": value}, timeout=0.5)
        except shmfeed.FeedSendTimeout:
            continue
        value += 1
        time.sleep(0.005)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before the screen is taken")
    parser.add_argument("--json", action="store_true", help="print --json instead of --once")
    args = parser.parse_args()
    namespace = f"readme-demo-{uuid.uuid4().hex[:6]}"
    os.environ["SHMFEED_NAMESPACE"] = namespace
    context = multiprocessing.get_context("fork")
    feed = shmfeed.Feed("ticks")
    logger = shmfeed.Channel(256, name="ticks-logger")
    worker = shmfeed.Channel(16, name="ticks-worker-3")
    subs = [feed.subscribe(logger), feed.subscribe(worker)]
    stop = shmfeed.Channel(8, name="stop")
    processes = [
        context.Process(target=read, args=(logger, 0.0, stop), name="logger"),
        context.Process(target=read, args=(worker, 2.0, stop), name="worker-3"),
        context.Process(target=hold, args=(worker, stop), name="helper"),
        context.Process(target=send, args=(stop,), name="sender"),
    ]
    for process in processes:
        process.start()
    try:
        time.sleep(args.settle)
        command = [sys.executable, "-m", "shmfeed._cli", "monitor", "--namespace", namespace,
                   "--json" if args.json else "--once"]
        sys.stdout.write(subprocess.run(command, capture_output=True, text=True, timeout=60).stdout)
        print("\n" + ", ".join(f"{p.name} {p.pid}" for p in processes), file=sys.stderr)
    finally:
        for _ in processes:
            stop.send("stop")
        for process in processes:
            process.join(30)
        for sub in subs:
            sub.unsubscribe()
    return 0


if __name__ == "__main__":
    sys.exit(main())
