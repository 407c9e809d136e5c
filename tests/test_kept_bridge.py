"""``SHMFEED_BRIDGE_URL``: the registry starts, keeps and stops a namespace's bridge (a real
nats-server; two namespaces standing for two hosts, no bridge started by hand)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import shmfeed
from shmfeed import _registry_client, _release
from shmfeed.testing import wait_until

from _nats import NatsServer
from test_bridge import Subscriber, hosts, in_namespace  # noqa: F401 (hosts: a fixture)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    monkeypatch.setenv("SHMFEED_BRIDGE_URL", server.url)
    monkeypatch.setenv("SHMFEED_BRIDGE_ARGS", "--feed prices")
    monkeypatch.setenv("SHMFEED_REGISTRY_IDLE", "1")
    try:
        yield server
    finally:
        server.stop()


def _bridge_pid(namespace: str) -> int | None:
    answer = _registry_client.ping(namespace)
    return None if answer is None else answer.get("bridge_pid")


def _crossing(feed: shmfeed.Feed[Any], remote: Subscriber, probe: str) -> bool:
    """Send a probe; whether one came across (both bridges up and subscribed)."""
    feed.send({"probe": probe})
    try:
        remote.channel.recv(0.2)
    except TimeoutError:
        return False
    while True:  # the probes still on their way
        try:
            remote.channel.recv(0.3)
        except TimeoutError:
            return True


def test_the_registry_keeps_a_bridge_restarts_it_and_stops_it_when_idle(kept: NatsServer, hosts: list[str]) -> None:
    a, b = hosts[:2]
    with in_namespace(b):
        remote = Subscriber("prices")
    feed: shmfeed.Feed[Any] = shmfeed.Feed("prices")
    bridges: list[psutil.Process] = []  # with their start times: a pid reused later is not them
    try:
        wait_until(lambda: _crossing(feed, remote, "first"), 30, "values crossing through the kept bridges")
        first_pid = _bridge_pid(b)
        assert first_pid is not None and _bridge_pid(a) not in (None, first_pid)
        bridges += [psutil.Process(first_pid), psutil.Process(_bridge_pid(a) or 0)]
        assert psutil.Process(first_pid).ppid() == _registry_client.ping(b)["pid"]  # type: ignore[index]
        for n in range(100):
            feed.send({"n": n})
        assert [remote.channel.recv(10) for _ in range(100)] == [{"n": n} for n in range(100)]

        os.kill(first_pid, signal.SIGKILL)  # the registry starts it again (and it fails nobody)
        wait_until(lambda: _bridge_pid(b) not in (None, first_pid), 20, "the bridge started again")
        bridges.append(psutil.Process(_bridge_pid(b) or 0))
        wait_until(lambda: _crossing(feed, remote, "again"), 30, "values crossing after the restart")
        feed.send({"after": 1})
        assert remote.channel.recv(10) == {"after": 1}
    finally:
        feed.detach()
        remote.close()
    # Once this process lets go, each bridge is its namespace's only user: the registries
    # stop them, then leave.
    for name in (a, b):
        _release.release_namespace(name)
    for name in (a, b):
        wait_until(lambda: _registry_client.ping(name, timeout=0.5) is None, 40, f"the registry of {name} leaving")
    for process in bridges:
        assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE, process


def test_a_bridge_of_a_sigkilled_registry_goes_with_it(kept: NatsServer, hosts: list[str]) -> None:
    feed: shmfeed.Feed[Any] = shmfeed.Feed("prices")
    try:
        wait_until(lambda: _bridge_pid(hosts[0]) is not None, 20, "the kept bridge")
        registry, bridge = _registry_client.ping(hosts[0])["pid"], _bridge_pid(hosts[0])  # type: ignore[index]
        assert bridge is not None
        process = psutil.Process(bridge)
        os.kill(registry, signal.SIGKILL)
        process.wait(20)  # PR_SET_PDEATHSIG: no orphan for the next registry to double
    finally:
        feed.detach()
