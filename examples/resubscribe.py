"""A subscriber that survives its feed's process being killed and restarted.

resubscribe_err keeps a subscription to Feed("ticker") established: when the only process
sending on it dies without closing it, the registry fails the subscription with
SenderDiedError, and resubscribe calls fn again, which subscribes anew. When the restarted
producer closes the feed, the subscription ends successfully and so does resubscribe's.

Prints:
    got tick 0 from producer 1
    got tick 1 from producer 1
    got tick 2 from producer 1
    killing producer 1
    subscription failed (SenderDiedError): subscribing again
    got tick 0 from producer 2
    got tick 1 from producer 2
    got tick 2 from producer 2
    producer 2 closed the feed: subscription ended
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading

import shmfeed


def producer(generation: int, close_when_done: bool) -> None:
    feed = shmfeed.Feed("ticker")
    for tick in range(3):
        feed.send((generation, tick))
    if close_when_done:
        feed.close()
    else:
        signal.pause()  # until killed


def main() -> None:
    ticks = shmfeed.Channel()
    subscribed = threading.Event()

    def subscribe(ctx: threading.Event, last_error: BaseException | None) -> shmfeed.Subscription:
        if last_error is not None:
            print(f"subscription failed ({type(last_error).__name__}): subscribing again", flush=True)
        subscription = shmfeed.Feed("ticker").subscribe(ticks)
        subscribed.set()
        return subscription

    subscription = shmfeed.resubscribe_err(1.0, subscribe)
    for generation in (1, 2):
        subscribed.wait()
        subscribed.clear()
        process = mp.Process(target=producer, args=(generation, generation == 2))
        process.start()
        for _ in range(3):
            sender, tick = ticks.recv(timeout=30)
            print(f"got tick {tick} from producer {sender}", flush=True)
        if generation == 1:
            print("killing producer 1", flush=True)
            os.kill(process.pid, signal.SIGKILL)
        process.join()

    if subscription.err().recv(timeout=30) is None:
        print("producer 2 closed the feed: subscription ended")


if __name__ == "__main__":
    main()
