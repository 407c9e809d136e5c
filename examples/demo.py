"""shmfeed in one minute: one feed, three subscriber processes, one work queue.

Run: python examples/demo.py
"""

from __future__ import annotations

import multiprocessing as mp
import sys

import shmfeed


def subscriber(name: str, channel: shmfeed.Channel, ready: mp.Event) -> None:
    ready.set()
    total = 0
    for price in channel:  # receives until the channel is closed
        total += price["cents"]
    # One write per line, so that the lines of several processes never interleave.
    sys.stdout.write(f"{name}: got {channel.statistics().received} prices, total {total} cents\n")
    sys.stdout.flush()


def worker(jobs: shmfeed.Channel, results: shmfeed.Channel) -> None:
    for job in jobs:
        results.send((job, job * job))


def main() -> None:
    prices: shmfeed.Feed[dict] = shmfeed.Feed("demo-prices")
    readers = []
    for index in range(3):
        channel = shmfeed.Channel(capacity=64)
        prices.subscribe(channel)
        ready = mp.Event()
        process = mp.Process(target=subscriber, args=(f"subscriber {index}", channel, ready))
        process.start()
        ready.wait()
        readers.append((process, channel))

    for cents in range(1, 1001):
        delivered = prices.send({"symbol": "ACME", "cents": cents})
        assert delivered == 3
    for process, channel in readers:
        channel.close()
        process.join()

    # A channel shared by several receivers is a work queue: each job goes to one worker.
    jobs, results = shmfeed.Channel(), shmfeed.Channel()
    workers = [mp.Process(target=worker, args=(jobs, results)) for _ in range(3)]
    for process in workers:
        process.start()
    for job in range(100):
        jobs.send(job)
    jobs.close()
    squares = dict(results.recv(timeout=10) for _ in range(100))
    for process in workers:
        process.join()
    print(f"work queue: 100 jobs done by 3 workers, sum of squares {sum(squares.values())}")
    prices.close()


if __name__ == "__main__":
    main()
