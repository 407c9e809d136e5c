"""SubscriptionScope, in one process and shared by name across processes."""

from __future__ import annotations

import os

import pytest

import shmfeed
import _scope_workers

pytestmark = pytest.mark.timeout(60)


class _Sub(shmfeed.Subscription):
    def __init__(self) -> None:
        self.unsubscribed = 0
        self._err = shmfeed.Channel(capacity=1)

    def err(self):
        return self._err

    def unsubscribe(self) -> None:
        self.unsubscribed += 1


def test_track_close_and_count_in_one_process():
    scope = shmfeed.SubscriptionScope()
    subs = [_Sub() for _ in range(3)]
    wrappers = [scope.track(sub) for sub in subs]
    assert scope.count() == 3
    wrappers[0].unsubscribe()
    wrappers[0].unsubscribe()
    assert scope.count() == 2 and subs[0].unsubscribed == 1
    scope.close()
    assert [sub.unsubscribed for sub in subs] == [1, 1, 1]
    assert scope.count() == 0
    assert scope.track(_Sub()) is None
    scope.close()  # twice is fine


def test_track_refuses_non_subscriptions():
    with pytest.raises(TypeError):
        shmfeed.SubscriptionScope().track(object())  # type: ignore[arg-type]


def test_context_manager_closes_and_ends_feed_subscriptions():
    feed = shmfeed.Feed()
    with shmfeed.SubscriptionScope() as scope:
        sub = scope.track(feed.subscribe(shmfeed.Channel()))
        assert feed.send(1) == 1
    assert sub.err().recv(timeout=5) is None
    assert feed.send(2) == 0


def test_a_named_scope_is_shared_by_processes(mp_context, namespace):
    scope = shmfeed.SubscriptionScope("job-42")
    feed = shmfeed.Feed("jobs")
    mine = scope.track(feed.subscribe(shmfeed.Channel()))
    results = shmfeed.Channel()
    go = shmfeed.Channel()
    workers = [
        mp_context.Process(target=_scope_workers.track_and_wait, args=(namespace, results, go))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    assert sorted(results.recv(timeout=30) for _ in workers) == ["tracked", "tracked"]
    assert scope.count() == 3
    assert feed.send("x") == 3
    scope.close()  # from this process: ends the subscriptions of every process
    assert mine.err().recv(timeout=5) is None
    assert sorted(results.recv(timeout=30) for _ in workers) == ["ended", "ended"]
    assert feed.send("y") == 0
    for _ in workers:
        go.send("exit")
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert os.getpid() > 0


def test_closing_a_named_scope_in_another_process(mp_context, namespace):
    scope = shmfeed.SubscriptionScope("job-7")
    feed = shmfeed.Feed()
    sub = scope.track(feed.subscribe(shmfeed.Channel()))
    closer = mp_context.Process(target=_scope_workers.close_scope, args=(namespace, "job-7"))
    closer.start()
    closer.join(30)
    assert closer.exitcode == 0
    assert sub.err().recv(timeout=5) is None
    assert scope.closed and scope.track(feed.subscribe(shmfeed.Channel())) is None
