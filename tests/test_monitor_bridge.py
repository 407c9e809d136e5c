"""``shmfeed monitor`` shows each bridge of the namespace (SPEC §7): the status files that
running bridges write (``_bridge_status``), read back by the monitor, ``--json`` and
``--once``; a dead bridge's file shown dead and removed by gc; planted and malformed files
skipped. The bridges are real ``shmfeed bridge`` processes on a real nats-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmfeed
from shmfeed import _bridge, _bridge_status, _gc, _names, _process
from shmfeed.testing import wait_until

from _nats import BridgeProcess
from test_bridge import hosts, in_namespace, nats_url  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def status_files(namespace: str) -> Iterator[str]:
    """The bridges directory; every file of the test's namespace in it removed at the end."""
    directory = _bridge_status.status_directory()
    token = _names.namespace_token(namespace)
    yield directory
    for name in os.listdir(directory):
        if name.startswith((token, f".{token}")):
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)


def _shmfeed(*args: str) -> subprocess.CompletedProcess[str]:
    """``shmfeed ARGS`` in the test's namespace (``SHMFEED_NAMESPACE``, inherited)."""
    return subprocess.run([sys.executable, "-m", "shmfeed._cli", *args], capture_output=True, text=True, timeout=60)


def _monitor_json() -> dict[str, Any]:
    result = _shmfeed("monitor", "--json", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def _monitor_once() -> str:
    result = _shmfeed("monitor", "--once", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    return result.stdout


def _bridge_cells(text: str, pid: int) -> list[str]:
    """The cells of the monitor's bridges table row that shows bridge ``pid``, each one's
    lines joined (a long server folds onto the next lines)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("│") and line.split("│")[1].strip() == str(pid)]
    assert len(starts) == 1, text
    cells = [cell.strip() for cell in lines[starts[0]].split("│")[1:-1]]
    for line in lines[starts[0] + 1:]:
        parts = line.split("│")[1:-1]
        if not line.startswith("│") or parts[0].strip():
            break  # the table's end, or the next bridge
        cells = [cell + part.strip() for cell, part in zip(cells, parts)]
    return cells


def _counts(namespace: str) -> list[tuple[str, int, int]]:
    return [(feed["name"], feed["out"], feed["in"]) for status in _bridge_status.read_all(namespace)
            for feed in status["feeds"]]


def test_the_monitor_shows_a_running_bridge_and_its_counts(nats_url: str, namespace: str, hosts: list[str],
                                                            status_files: str) -> None:
    here, there = hosts[:2]
    local = shmfeed.Channel(16)
    local_feed = shmfeed.Feed("prices")
    local_subscription = local_feed.subscribe(local)
    with in_namespace(there):
        remote = shmfeed.Channel(16)
        remote_feed = shmfeed.Feed("prices")
        remote_subscription = remote_feed.subscribe(remote)
    bridge_here = bridge_there = None
    try:
        bridge_here = BridgeProcess(nats_url, here, ["prices"])
        bridge_there = BridgeProcess(nats_url, there, ["prices"])
        for n in range(5):  # 5 values out of here, 3 into here
            local_feed.send({"n": n})
        for n in range(3):
            remote_feed.send({"m": n})
        got_there = [remote.recv(10) for _ in range(3 + 5)]
        assert [value for value in got_there if "n" in value] == [{"n": n} for n in range(5)]
        got_here = [local.recv(10) for _ in range(5 + 3)]
        assert [value for value in got_here if "m" in value] == [{"m": n} for n in range(3)]
        wait_until(lambda: _counts(here) == [("prices", 5, 3)], 10, "the bridge's status file has the counts")

        view = _monitor_json()
        assert view["schema"] == 4
        (bridge,) = view["bridges"]  # the other namespace's bridge is not this namespace's
        assert (bridge["pid"], bridge["alive"], bridge["connected"], bridge["mode"]) == \
            (bridge_here.process.pid, True, True, "core")
        assert (bridge["namespace"], bridge["realm"], bridge["server"], bridge["lag"]) == (here, "default", nats_url, None)
        assert bridge["feeds"] == [{"name": "prices", "subject": _bridge.subject_of("default", "prices"),
                                    "out": 5, "in": 3, "dropped": {}}]
        assert bridge["feeds_total"] == 1 and bridge["age_s"] < 5

        cells = _bridge_cells(_monitor_once(), bridge_here.process.pid)
        assert cells == [str(bridge_here.process.pid), "default", nats_url, "connected", "core", "1", "3", "5", "0", "-"]

        code, _ = bridge_here.stop()  # a clean stop removes the file
        assert code == 0
        assert not os.path.exists(_bridge_status.status_path(here, "default"))
        assert _bridge_status.read_all(here) == []
        assert [status["pid"] for status in _bridge_status.read_all(there)] == [bridge_there.process.pid]
    finally:
        for process in (bridge_here, bridge_there):
            if process is not None:
                process.end()
        local_subscription.unsubscribe()
        remote_subscription.unsubscribe()
        for channel in (local, remote):
            channel.close()
        local_feed.detach()
        remote_feed.detach()


def test_a_killed_bridge_is_shown_dead_until_gc_removes_its_file(nats_url: str, namespace: str, status_files: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # No registry: it would notice the death and remove the file itself (the next test).
    monkeypatch.setenv("SHMFEED_NO_REGISTRY", "1")
    bridge = BridgeProcess(nats_url, namespace, ["prices"])
    path = _bridge_status.status_path(namespace, "default")
    try:
        assert [status["alive"] for status in _bridge_status.read_all(namespace)] == [True]
        bridge.process.send_signal(signal.SIGKILL)
        assert bridge.process.wait(10) == -signal.SIGKILL
        view = _monitor_json()
        assert [(status["pid"], status["alive"]) for status in view["bridges"]] == [(bridge.process.pid, False)]
        assert path in view["leftovers"]
        assert _bridge_cells(_monitor_once(), bridge.process.pid)[3] == "dead"
        assert os.path.exists(path)  # the monitor removes nothing

        removed = _shmfeed("gc")
        assert removed.returncode == 0, removed.stderr
        assert f"removed {path}" in removed.stdout
        assert not os.path.exists(path)
    finally:
        bridge.kill()


def test_the_registry_removes_a_killed_bridges_file(nats_url: str, namespace: str, status_files: str) -> None:
    bridge = BridgeProcess(nats_url, namespace, ["prices"])
    path = _bridge_status.status_path(namespace, "default")
    try:
        assert os.path.exists(path)
        bridge.process.send_signal(signal.SIGKILL)
        assert bridge.process.wait(10) == -signal.SIGKILL
        wait_until(lambda: not os.path.exists(path), 20, "the registry removed the dead bridge's status file")
    finally:
        bridge.kill()


class _FakeBridge:
    """What ``StatusPublisher`` reads of a ``Bridge``: its realm and ``statistics()``."""

    def __init__(self, realm: str = "default", **extra: object) -> None:
        self.realm = realm
        self.out = 0
        self.extra = extra

    def statistics(self) -> Any:
        feed = _bridge.BridgeFeedStatistics("prices", _bridge.subject_of(self.realm, "prices"), self.out, 2,
                                            {"overflow": 1})
        fields = dict(origin="0" * 32, server="nats://***@127.0.0.1:4222", connected=False, reconnects=3,
                      feeds=(feed,))
        if self.extra:  # the fields a durable bridge adds
            return types.SimpleNamespace(**fields, **self.extra)
        return _bridge.BridgeStatistics(**fields)  # type: ignore[arg-type]


def test_a_publisher_writes_a_private_file_every_second_and_removes_it_at_stop(namespace: str,
                                                                              status_files: str) -> None:
    fake = _FakeBridge()
    publisher = _bridge_status.StatusPublisher(fake)  # type: ignore[arg-type]
    publisher.start()
    path = _bridge_status.status_path(namespace, "default")
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.stat(status_files).st_mode & 0o777 == 0o700
        (status,) = _bridge_status.read_all(namespace)
        assert (status["pid"], status["start_ticks"]) == _process.identity()
        assert (status["connected"], status["reconnects"], status["mode"], status["lag"]) == (False, 3, "core", None)
        assert status["server"] == "nats://***@127.0.0.1:4222" and status["alive"]
        assert status["feeds"] == [{"name": "prices", "subject": _bridge.subject_of("default", "prices"), "out": 0,
                                    "in": 2, "dropped": {"overflow": 1}}]
        fake.out = 7
        wait_until(lambda: _counts(namespace) == [("prices", 7, 2)], 5, "the next write")
    finally:
        publisher.stop()
    assert not os.path.exists(path)
    publisher.write()  # a write after stop() (a timer that fired late) writes nothing
    assert not os.path.exists(path)
    assert not [name for name in os.listdir(status_files) if name.startswith(".")]  # no temporary left

    durable = _bridge_status.StatusPublisher(_FakeBridge("durable-realm", mode="durable", lag=42))  # type: ignore[arg-type]
    durable.start()
    try:
        (status,) = _bridge_status.read_all(namespace)
        assert (status["realm"], status["mode"], status["lag"]) == ("durable-realm", "durable", 42)
    finally:
        durable.stop()


def _valid_status(namespace: str, realm: str, **changes: object) -> dict[str, Any]:
    pid, ticks = _process.identity()
    status: dict[str, Any] = {
        "pid": pid, "start_ticks": ticks, "namespace": namespace, "realm": realm, "origin": "1" * 32,
        "server": "nats://127.0.0.1:4222", "connected": True, "reconnects": 0, "mode": "core", "lag": None,
        "updated": 0.0, "feeds_total": 1,
        "feeds": [{"name": "prices", "subject": "shmfeed.x.y", "out": 1, "in": 2, "dropped": {}}],
    }
    status.update(changes)
    return status


def _feed(**changes: object) -> dict[str, Any]:
    return {"name": "prices", "subject": "shmfeed.x.y", "out": 1, "in": 2, "dropped": {}, **changes}


HOSTILE_SERVER = "nats://\x1b]0;owned\x07[red]h[/red]:4222"
HOSTILE_FEED = "\x9b2J[bold]F"


def test_planted_and_malformed_status_files_are_skipped(namespace: str, status_files: str, tmp_path: Path) -> None:
    import time

    token = _names.namespace_token(namespace)

    def place(realm: str) -> str:
        return os.path.join(status_files, f"{token}-{realm}.json")

    def write(realm: str, content: bytes | dict[str, Any], mode: int = 0o600) -> str:
        path = place(realm)
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.chmod(path, mode)  # past the umask
        return path

    good = _valid_status(namespace, "good", server=HOSTILE_SERVER, updated=time.time(),
                         feeds=[_feed(name=HOSTILE_FEED, dropped={"overflow": 4, "type": 1, "closed": 9})])
    write("good", good)
    broken: dict[str, bytes | dict[str, Any]] = {
        "garbage": b"{not json",
        "binary": bytes(range(256)),
        "deep": b"[" * 200_000,
        "too-big": json.dumps(_valid_status(namespace, "too-big", pad="x" * _bridge_status.MAX_FILE_BYTES)).encode(),
        "list": b"[1, 2]",
        "huge-server": _valid_status(namespace, "huge-server", server="x" * 100_000),
        "huge-name": _valid_status(namespace, "huge-name", feeds=[_feed(name="n" * 10_000)]),
        "pid-text": _valid_status(namespace, "pid-text", pid=str(os.getpid())),
        "pid-zero": _valid_status(namespace, "pid-zero", pid=0),
        "pid-huge": _valid_status(namespace, "pid-huge", pid=10 ** 30),
        "ticks-float": _valid_status(namespace, "ticks-float", start_ticks=1.5),
        "connected-int": _valid_status(namespace, "connected-int", connected=1),
        "reconnects-bool": _valid_status(namespace, "reconnects-bool", reconnects=True),
        "lag-negative": _valid_status(namespace, "lag-negative", lag=-1),
        "updated-text": _valid_status(namespace, "updated-text", updated="now"),
        "mode-list": _valid_status(namespace, "mode-list", mode=["core"]),
        "no-origin": {k: v for k, v in _valid_status(namespace, "no-origin").items() if k != "origin"},
        "feeds-dict": _valid_status(namespace, "feeds-dict", feeds={"prices": 1}),
        "too-many-feeds": _valid_status(namespace, "too-many-feeds",
                                        feeds=[_feed()] * (_bridge_status.MAX_FEEDS + 1)),
        "feeds-total-low": _valid_status(namespace, "feeds-total-low", feeds_total=0),
        "out-negative": _valid_status(namespace, "out-negative", feeds=[_feed(out=-1)]),
        "in-float": _valid_status(namespace, "in-float", feeds=[_feed(**{"in": 2.0})]),
        "reason-long": _valid_status(namespace, "reason-long", feeds=[_feed(dropped={"r" * 1000: 1})]),
        "reason-count": _valid_status(namespace, "reason-count", feeds=[_feed(dropped={"overflow": "1"})]),
        "many-reasons": _valid_status(namespace, "many-reasons",
                                      feeds=[_feed(dropped={str(n): 1 for n in range(100)})]),
        "other-namespace": _valid_status(namespace + "-other", "other-namespace"),
        "other-realm": _valid_status(namespace, "not-its-name"),
    }
    for realm, content in broken.items():
        write(realm, content)
    (tmp_path / "elsewhere.json").write_text(json.dumps(_valid_status(namespace, "link")))
    os.symlink(tmp_path / "elsewhere.json", place("link"))  # a symlink is never followed
    write("open-to-others", _valid_status(namespace, "open-to-others"), mode=0o644)
    os.mkfifo(place("fifo"), 0o600)  # never waited on
    os.mkdir(place("directory"), 0o700)
    if os.geteuid() == 0:  # root can give a file away: another user's file is never read
        os.chown(write("foreign", _valid_status(namespace, "foreign")), 65534, 65534)
    write("bad realm!", _valid_status(namespace, "bad realm!"))  # not a name a bridge writes

    statuses = _bridge_status.read_all(namespace)
    assert [status["realm"] for status in statuses] == ["good"]
    assert statuses[0]["alive"] and statuses[0]["feeds"][0]["name"] == HOSTILE_FEED

    view = _monitor_json()  # a namespace with nothing but a bridge's status is shown
    assert [(status["realm"], status["server"]) for status in view["bridges"]] == [("good", HOSTILE_SERVER)]
    shown = _monitor_once()
    assert not [c for c in shown if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F], shown
    cells = _bridge_cells(shown, os.getpid())
    assert cells[2:4] == ["nats://\\x1b]0;owned\\x07[red]h[/red]:4222", "connected"], shown  # escaped, no markup
    assert cells[8] == "14: closed 9, overflow 4 …", shown
    assert _bridge_status.stale(namespace, remove=False) == []  # nothing here is a dead bridge's to remove


def test_gc_removes_dead_bridges_files_and_nothing_else(namespace: str, status_files: str) -> None:
    import time

    token = _names.namespace_token(namespace)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(30)  # its pid now names no process (or another one, started later)
    dead_ticks = _process.identity()[1] + 1
    written = {
        "live": _valid_status(namespace, "live", updated=time.time()),
        "dead": _valid_status(namespace, "dead", pid=child.pid, start_ticks=dead_ticks),
    }
    for realm, status in written.items():
        path = os.path.join(status_files, f"{token}-{realm}.json")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(status, file)
    temporary = os.path.join(status_files, f".{token}-dead.json.{child.pid}.0123abcd.tmp")  # a writer killed mid-way
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    dead = os.path.join(status_files, f"{token}-dead.json")

    assert [(status["realm"], status["alive"]) for status in _bridge_status.read_all(namespace)] == \
        [("dead", False), ("live", True)]
    assert _bridge_cells(_monitor_once(), child.pid)[3] == "dead"
    assert sorted(_gc.sweep(namespace, remove=False).files) == sorted([dead, temporary])
    removed = _shmfeed("gc")
    assert removed.returncode == 0, removed.stderr
    assert f"removed {dead}" in removed.stdout and f"removed {temporary}" in removed.stdout
    assert [status["realm"] for status in _bridge_status.read_all(namespace)] == ["live"]
    assert not os.path.exists(temporary)


def test_a_bridge_status_is_rendered_with_its_state() -> None:
    from shmfeed import _monitor

    status = {"alive": True, "age_s": 0.5, "connected": True, "reconnects": 0}
    assert _monitor._bridge_state(status)[0] == "connected"
    assert _monitor._bridge_state({**status, "connected": False, "reconnects": 2})[0] == "disconnected (2 reconnects)"
    assert _monitor._bridge_state({**status, "age_s": 12.0})[0] == "no update 12s"
    assert _monitor._bridge_state({**status, "alive": False})[0] == "dead"
    assert _monitor._dropped([{"dropped": {}}]) == "0"
    assert _monitor._dropped([{"dropped": {"a": 1}}, {"dropped": {"a": 2, "b": 5}}]) == "8: b 5, a 3"
