"""go-ethereum's ExampleTypeMux, with the subscriber in another process.

A named TypeMux is shared by every process that opens its name. The subscriber only gets
the event types it subscribed to (not yetAnotherEvent), and stop() closes its channel.

Prints:
    Received: someEvent(I=5)
    Received: someEvent(I=6)
    Received: otherEvent(S='whoa')
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass

import shmfeed


@dataclass
class someEvent:  # noqa: N801 - geth's names
    I: int  # noqa: E741


@dataclass
class otherEvent:  # noqa: N801
    S: str


@dataclass
class yetAnotherEvent:  # noqa: N801
    X: int
    Y: int


def subscriber(ready: shmfeed.Channel) -> None:
    mux = shmfeed.TypeMux("example")
    sub = mux.subscribe(someEvent, otherEvent, capacity=16)
    ready.send("subscribed")
    for event in sub.chan():  # until the mux is stopped
        print(f"Received: {event.data!r}", flush=True)


def main() -> None:
    mux = shmfeed.TypeMux("example")
    ready = shmfeed.Channel()
    process = mp.Process(target=subscriber, args=(ready,))
    process.start()
    ready.recv()

    mux.post(someEvent(5))
    mux.post(yetAnotherEvent(X=3, Y=4))
    mux.post(someEvent(6))
    mux.post(otherEvent("whoa"))

    mux.stop()  # closes every subscription's channel, in every process
    process.join()


if __name__ == "__main__":
    main()
