"""Three ways to end a consumer process, each the right one somewhere.

1. Close the channel: ``for value in channel:`` takes what is left, then ends.
2. A sentinel: a work queue read by several consumers gets one ``None`` per consumer.
3. End the subscription: ``for value in sub:`` ends when the feed is closed or the
   subscription unsubscribed (``sub.unsubscribe()``, from any thread of its process).

Prints:
    closed channel: the consumer took 10 values, then its loop ended
    sentinel: 3 consumers took 30 jobs, then one None each
    ended subscription: the consumer took 10 values, then its loop ended
"""

from __future__ import annotations

import multiprocessing as mp

import shmfeed


def drain(channel: shmfeed.Channel, results: shmfeed.Channel) -> None:
    taken = 0
    for _value in channel:        # until the channel is closed (and drained)
        taken += 1
    results.send(taken)


def take_jobs(jobs: shmfeed.Channel, results: shmfeed.Channel) -> None:
    taken = 0
    while (job := jobs.recv()) is not None:    # None: no more jobs for this consumer
        taken += 1
    results.send(taken)


def follow(ready: shmfeed.Channel, results: shmfeed.Channel) -> None:
    updates = shmfeed.Channel()
    with shmfeed.Feed("ticks").subscribe(updates) as sub:
        ready.send(True)
        taken = sum(1 for _value in sub)       # until the feed is closed
    results.send(taken)


def main() -> None:
    ctx = mp.get_context("spawn")
    results = shmfeed.Channel()

    # 1. Close the channel.
    channel = shmfeed.Channel()
    consumer = ctx.Process(target=drain, args=(channel, results))
    consumer.start()
    for value in range(10):
        channel.send(value)
    channel.close()
    print(f"closed channel: the consumer took {results.recv(timeout=60)} values, then its loop ended")
    consumer.join()

    # 2. A sentinel per consumer.
    jobs = shmfeed.Channel()
    consumers = [ctx.Process(target=take_jobs, args=(jobs, results)) for _ in range(3)]
    for process in consumers:
        process.start()
    for job in range(30):
        jobs.send(job)
    for _ in consumers:
        jobs.send(None)
    taken = sum(results.recv(timeout=60) for _ in consumers)
    print(f"sentinel: {len(consumers)} consumers took {taken} jobs, then one None each")
    for process in consumers:
        process.join()

    # 3. End the subscription.
    feed, ready = shmfeed.Feed("ticks"), shmfeed.Channel()
    consumer = ctx.Process(target=follow, args=(ready, results))
    consumer.start()
    ready.recv(timeout=60)
    for value in range(10):
        feed.send(value)
    feed.close()
    print(f"ended subscription: the consumer took {results.recv(timeout=60)} values, then its loop ended")
    consumer.join()


if __name__ == "__main__":
    main()
