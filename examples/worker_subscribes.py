"""Worker processes that subscribe themselves, inside the function they run.

Each worker opens the named feed and subscribes its own channel within
``with feed.subscribe(...)``: the subscription ends when the block does, whatever happens.
Its ``for value in sub:`` loop ends when the parent closes the feed. The workers are
started with spawn, where a subscription at module level would go wrong (see
``module_level_subscribe.py``); written this way it works under every start method.

Prints:
    worker 0: 100 updates, total 5050
    worker 1: 100 updates, total 5050
"""

from __future__ import annotations

import multiprocessing as mp

import shmfeed


def worker(index: int, ready: shmfeed.Channel, reports: shmfeed.Channel) -> None:
    feed = shmfeed.Feed("updates")          # the parent's feed, opened by name
    updates = shmfeed.Channel()
    with feed.subscribe(updates) as sub:    # unsubscribed when the block ends
        ready.send(index)                   # subscribed: the parent may send
        count = total = 0
        for value in sub:                   # ends once the feed is closed
            count += 1
            total += value
    reports.send((index, count, total))


def main() -> None:
    ctx = mp.get_context("spawn")
    feed = shmfeed.Feed("updates")
    ready, reports = shmfeed.Channel(), shmfeed.Channel()
    workers = [ctx.Process(target=worker, args=(i, ready, reports)) for i in range(2)]
    for process in workers:
        process.start()
    for _ in workers:
        ready.recv(timeout=60)
    for update in range(1, 101):
        feed.send(update)
    feed.close()                            # every worker's loop ends
    for index, count, total in sorted(reports.recv(timeout=60) for _ in workers):
        print(f"worker {index}: {count} updates, total {total}")
    for process in workers:
        process.join()


if __name__ == "__main__":
    main()
