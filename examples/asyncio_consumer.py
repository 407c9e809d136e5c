"""An asyncio service consuming a feed with ``async for``, fed by another process.

Waiting for events does not block the event loop: a heartbeat task keeps running while the
consumer waits.

Prints:
    consumed 10 ticks: 0 1 2 3 4 5 6 7 8 9
    the event loop stayed responsive while waiting
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp

import shmfeed


def producer(feed: shmfeed.Feed, go: shmfeed.Channel) -> None:
    go.recv()
    for tick in range(10):
        feed.send(tick)
    feed.close()


async def service(ticks: shmfeed.Channel, go: shmfeed.Channel) -> None:
    beats = 0

    async def heartbeat() -> None:
        nonlocal beats
        while True:
            beats += 1
            await asyncio.sleep(0.001)

    beating = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.01)
    go.send("start")
    received = []
    async for tick in ticks:  # ends when the channel is closed
        received.append(tick)
        if len(received) == 10:
            ticks.close()
    beating.cancel()
    print("consumed 10 ticks:", *received)
    if beats > 1:
        print("the event loop stayed responsive while waiting")


def main() -> None:
    feed, ticks, go = shmfeed.Feed("ticks"), shmfeed.Channel(), shmfeed.Channel()
    feed.subscribe(ticks)
    process = mp.Process(target=producer, args=(feed, go))
    process.start()
    asyncio.run(service(ticks, go))
    process.join()


if __name__ == "__main__":
    main()
