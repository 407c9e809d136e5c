"""go-ethereum's ExampleSubscriptionScope, with the subscriber in another process.

Two servers compute on request and publish every result on a feed. The App tracks the
subscriptions it hands out in a SubscriptionScope; stopping the App closes the scope,
which ends those subscriptions, so the subscriber (another process, selecting over the
results and the subscriptions' error channels) exits.

Go's unbuffered channels make Calc wait until the subscriber took the result; shmfeed's
channels are buffered, so the subscriber acknowledges each result to keep the same order.

Prints:
    division happened: 2
    multiplication happened: 12
    subscriber exited
"""

from __future__ import annotations

import multiprocessing as mp

import shmfeed


class App:
    def __init__(self) -> None:
        self.div_results: shmfeed.Feed[int] = shmfeed.Feed()
        self.mul_results: shmfeed.Feed[int] = shmfeed.Feed()
        self.scope = shmfeed.SubscriptionScope()
        self.acks = shmfeed.Channel()

    def calc(self, op: str, a: int, b: int) -> int:
        if op == "/":
            result = a // b
            delivered = self.div_results.send(result)
        elif op == "*":
            result = a * b
            delivered = self.mul_results.send(result)
        else:
            raise ValueError(f"invalid op {op!r}")
        for _ in range(delivered):
            self.acks.recv()
        return result

    def subscribe_results(self, op: str, channel: shmfeed.Channel) -> shmfeed.Subscription:
        feed = self.div_results if op == "/" else self.mul_results
        subscription = self.scope.track(feed.subscribe(channel))
        assert subscription is not None
        return subscription

    def stop(self) -> None:
        self.scope.close()


def subscriber(divs, muls, div_err, mul_err, acks) -> None:
    try:
        while True:
            channel, value = shmfeed.select(divs, muls, div_err, mul_err)
            if channel is divs:
                print("division happened:", value, flush=True)
            elif channel is muls:
                print("multiplication happened:", value, flush=True)
            else:
                return
            acks.send(None)
    finally:
        print("subscriber exited", flush=True)


def main() -> None:
    app = App()
    divs, muls = shmfeed.Channel(), shmfeed.Channel()
    div_sub = app.subscribe_results("/", divs)
    mul_sub = app.subscribe_results("*", muls)
    # Channels and error channels can be passed to another process.
    process = mp.Process(
        target=subscriber,
        args=(divs, muls, div_sub.err(), mul_sub.err(), app.acks),
    )
    process.start()

    app.calc("/", 22, 11)
    app.calc("*", 3, 4)

    app.stop()  # ends the subscriptions: their err() closes, the subscriber exits
    process.join()


if __name__ == "__main__":
    main()
