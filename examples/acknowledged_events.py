"""go-ethereum's ExampleFeed_acknowledgedEvents, with the consumers in other processes.

The return value of Feed.send tells the producer how many consumers got an event, so it
can wait for that many acknowledgements before it sends the next one. Each event carries
the Channel to acknowledge on: channels travel inside events.

Prints 0 0 0 1 1 1 2 2 2, one per line.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from dataclasses import dataclass

import shmfeed


@dataclass
class AckedEvent:
    i: int
    ack: shmfeed.Channel


def consumer(events: shmfeed.Channel, done: shmfeed.Channel) -> None:
    while True:
        channel, event = shmfeed.select(events, done)
        if channel is done:
            return
        # "Process" the event: one write per line, so lines of processes never interleave.
        sys.stdout.write(f"{event.i}\n")
        sys.stdout.flush()
        event.ack.send(None)


def main() -> None:
    feed: shmfeed.Feed[AckedEvent] = shmfeed.Feed()
    done = shmfeed.Channel()
    consumers = []
    for _ in range(3):
        events = shmfeed.Channel(capacity=100)
        feed.subscribe(events)
        process = mp.Process(target=consumer, args=(events, done))
        process.start()
        consumers.append(process)

    # Send events with increasing i; wait for every consumer's ack before the next.
    for i in range(3):
        ack = shmfeed.Channel()
        delivered = feed.send(AckedEvent(i, ack))
        for _ in range(delivered):
            ack.recv()

    for _ in consumers:
        done.send("stop")
    for process in consumers:
        process.join()
    feed.close()


if __name__ == "__main__":
    main()
