#!/usr/bin/env python3
"""Does a long-lived receiver's memory stay flat? A focused leak check for the data path.

    python tools/rss_check.py [--values N] [--seed S]

One sender process sends N values (three in four of 1-1.3 MiB, the rest 2-12 KiB; as a
dict, a tuple inside a dict and a list inside a dict, so plain, ext and in-parts encodings
all travel) on a feed to two channels in one receiver process: one whose ring spills large
values to files, one large enough to carry them inline. The receiver checks every value and
samples its own resident memory twelve times, split as /proc reports it: ``RssAnon`` (its
heap: a leak shows here) and ``RssShmem`` (pages of rings and spill files it maps, bounded
by the rings and the mapping cache). Exits non-zero if ``RssAnon`` grows by more than
``--slack`` MiB between the second sample (warmed up) and the last.

The soak (``tools/soak.py``) reports whole RSS under kills and churn; this separates what
the library keeps from what the machine's allocator and mappings do.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import sys


def _memory() -> dict[str, int]:
    """This process's resident memory in MiB, by kind."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("RssAnon", "RssShmem", "RssFile")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) // 1024
    return out


def _value(i: int, rng: random.Random) -> dict:
    size = rng.randint(1 << 20, 1_300_000) if i % 4 else rng.randint(2_000, 12_000)
    blob = bytes([i % 256]) * size
    return [{"seq": i, "blob": blob}, {"seq": i, "t": (i, blob)}, {"seq": i, "l": [blob, "x"]}][i % 3]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", type=int, default=30_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--slack", type=float, default=2.0, help="MiB of RssAnon growth allowed after warm-up")
    args = ap.parse_args(argv)
    os.environ["SHMFEED_NAMESPACE"] = f"rsscheck-{os.getpid()}"
    import shmfeed
    from shmfeed import _gc, _release

    namespace = os.environ["SHMFEED_NAMESPACE"]

    n = max(args.values, 12)
    feed = shmfeed.Feed()
    spilling, inline = shmfeed.Channel(capacity=8), shmfeed.Channel(capacity=8, buffer_size=8 << 20)
    subscriptions = [feed.subscribe(spilling), feed.subscribe(inline)]
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the receiver
        os.close(reader)
        samples, bad = [], 0
        expect = random.Random(args.seed)
        for i in range(n):
            want = _value(i, expect)
            bad += (spilling.recv(timeout=60) != want) + (inline.recv(timeout=60) != want)
            if i % (n // 12) == n // 12 - 1:
                samples.append(_memory())
        os.write(writer, repr((bad, samples)).encode())
        _release.release_namespace(namespace)  # os._exit skips the exit hooks that do this
        os._exit(0)
    os.close(writer)
    rng = random.Random(args.seed)
    for i in range(n):
        feed.send(_value(i, rng))
    report = b""
    while chunk := os.read(reader, 65536):
        report += chunk
    os.waitpid(child, 0)
    for subscription in subscriptions:
        subscription.unsubscribe()
    spilling.close()
    inline.close()
    feed.close()
    del subscriptions, spilling, inline, feed
    _release.release_namespace(namespace)
    bad, samples = ast.literal_eval(report.decode()) if report else (n, [])
    for k, sample in enumerate(samples, 1):
        print(f"after {k * (n // 12):>7,} values: " + ", ".join(f"{key} {mib} MiB" for key, mib in sample.items()))
    growth = samples[-1]["RssAnon"] - samples[1]["RssAnon"] if len(samples) >= 2 else float("inf")
    left = _gc.namespace_entries(namespace)
    ok = bad == 0 and growth <= args.slack and not left
    print(f"{n:,} values, {bad} wrong; RssAnon after warm-up {growth:+} MiB (allowed {args.slack}); "
          f"{len(left)} entries of its namespace left in /dev/shm -> {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
