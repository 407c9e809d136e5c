"""What goes wrong when a module subscribes at import time and its workers are spawned.

Under spawn and forkserver every child runs the main module again, as ``__mp_main__``:
the lines outside ``if __name__ == "__main__":`` make, in each worker, a Channel of its
own and subscribe it to the same named feed. Nobody ever reads those channels. Once one
holds ``capacity`` values (64 here), every send waits for room in it: without a timeout,
the program stalls there for good, saying nothing. Subscribe inside the worker instead
(``worker_subscribes.py``, ``pool_workers.py``). This program sends with a timeout, so
that the stall shows.

Prints:
    3 subscriptions: the parent's and one per worker
    64 sends delivered
    send 65 timed out: delivered to 1 channel, 2 not read by anyone
"""

from __future__ import annotations

import multiprocessing as mp
import time

import shmfeed

# Wrong: this runs again in every spawned worker.
feed = shmfeed.Feed("prices")
channel = shmfeed.Channel(capacity=64)
subscription = feed.subscribe(channel)


def main() -> None:
    with mp.get_context("spawn").Pool(2) as pool:
        while feed.statistics().subscriptions < 3:    # the workers subscribe as they start
            time.sleep(0.01)
        print(f"{feed.send(0)} subscriptions: the parent's and one per worker")
        channel.recv()
        sent = 1
        try:
            while True:
                feed.send(sent, timeout=1)
                channel.recv()      # the parent reads its own channel
                sent += 1
        except shmfeed.FeedSendTimeout as stalled:
            print(f"{sent} sends delivered")
            print(f"send {sent + 1} timed out: delivered to {stalled.delivered} channel,"
                  f" {len(stalled.pending)} not read by anyone")
    subscription.unsubscribe()


if __name__ == "__main__":
    main()
