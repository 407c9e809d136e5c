"""A multiprocessing.Pool whose workers subscribe to a feed, and a pool draining a work queue.

1. Fan-out: each worker subscribes its own channel to Feed("pool-config") in the Pool's
   initializer; every update the parent sends reaches every worker.
2. Work queue: one channel shared by the workers; each job goes to exactly one of them.

Prints:
    fan-out: 3 workers each applied 100 updates (total 5050)
    work queue: 30 jobs done exactly once by 3 workers
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import shmfeed

WORKERS = 3


def subscribe_worker(feed: shmfeed.Feed, reports: shmfeed.Channel) -> None:
    """Pool initializer: subscribe this worker and apply updates in a background thread."""
    updates = shmfeed.Channel()
    subscription = feed.subscribe(updates)

    def apply_updates() -> None:
        count = total = 0
        while True:
            channel, value = shmfeed.select(updates, subscription.err())
            if channel is updates:
                count += 1
                total += value
            else:  # the feed was closed: take what is still waiting, then report
                while len(updates):
                    count += 1
                    total += updates.recv()
                reports.send((os.getpid(), count, total))
                return

    threading.Thread(target=apply_updates, daemon=True).start()
    reports.send(("ready", os.getpid()))


def work_queue_worker(jobs: shmfeed.Channel, results: shmfeed.Channel) -> int:
    done = 0
    for job in jobs:  # until the channel is closed and drained
        results.send((job, job * job))
        done += 1
    return done


def main() -> None:
    feed, reports = shmfeed.Feed("pool-config"), shmfeed.Channel()
    with mp.Pool(WORKERS, initializer=subscribe_worker, initargs=(feed, reports)) as pool:
        for _ in range(WORKERS):
            assert reports.recv(timeout=30)[0] == "ready"
        for update in range(1, 101):
            assert feed.send(update) == WORKERS
        feed.close()  # ends the subscriptions: each worker reports what it applied
        applied = [reports.recv(timeout=30) for _ in range(WORKERS)]
        totals = {total for _, count, total in applied if count == 100}
        print(f"fan-out: {WORKERS} workers each applied 100 updates (total {totals.pop()})")

        jobs, results = shmfeed.Channel(), shmfeed.Channel()
        running = [pool.apply_async(work_queue_worker, (jobs, results)) for _ in range(WORKERS)]
        for job in range(30):
            jobs.send(job)
        jobs.close()
        squares = dict(results.recv(timeout=30) for _ in range(30))
        done = sum(task.get(timeout=30) for task in running)
        assert sorted(squares) == list(range(30)) and done == 30
        print(f"work queue: {done} jobs done exactly once by {WORKERS} workers")


if __name__ == "__main__":
    main()
