"""shmfeed monitor: --json and --once on a known scene, and the live view in a terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

import _monitor_workers as W
import shmfeed

pytestmark = pytest.mark.timeout(90)


def _monitor(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmfeed._cli", "monitor", "--namespace", namespace, "--interval", "0.2", *args],
        capture_output=True, text=True, timeout=60,
    )


def test_json_and_once_describe_the_scene_exactly(mp_context, namespace):
    # The scene: 2 feeds, 5 channels in 3 processes, one channel full and its sender blocked.
    alpha = shmfeed.Feed("alpha")
    full = shmfeed.Channel(capacity=4)
    alpha_sub = alpha.subscribe(full)
    spare = [shmfeed.Channel(capacity=16) for _ in range(2)]  # in this process, not subscribed
    ready, stop = mp_context.SimpleQueue(), mp_context.SimpleQueue()  # not channels: keep the scene exact
    holder = mp_context.Process(target=W.hold_two_channels, args=(namespace, ready, stop))
    sender = mp_context.Process(target=W.send_until_blocked, args=(namespace, ready))
    holder.start()
    sender.start()
    pids = {ready.get(), ready.get()}
    deadline = time.monotonic() + 30
    while full.statistics().waiting_senders != 1:
        assert time.monotonic() < deadline, "the sender never blocked"
        time.sleep(0.01)
    try:
        result = _monitor(namespace, "--json")
        assert result.returncode == 0, result.stderr
        view = json.loads(result.stdout)
        assert view["totals"]["feeds"] == 2
        assert view["totals"]["channels"] == 5
        assert view["totals"]["processes"] == 3
        assert view["totals"]["blocked_senders"] == 1
        assert view["registry"] and view["registry"]["pid"] > 0
        feeds = {feed["name"]: feed for feed in view["feeds"]}
        assert set(feeds) == {"alpha", "beta"}
        assert len(feeds["alpha"]["subscriptions"]) == 1 and len(feeds["beta"]["subscriptions"]) == 2
        assert [p["pid"] for p in feeds["alpha"]["senders"]] == [sender.pid]
        blocked = view["channels"][0]  # blocked channels sort first
        assert blocked["id"] == f"{full._channel_id:016x}"
        assert (blocked["fill"], blocked["capacity"]) == (4, 4)
        assert blocked["waiting_senders"] == [sender.pid]
        assert blocked["owner_pid"] == os.getpid()
        owners = sorted(channel["owner_pid"] for channel in view["channels"])
        assert owners == sorted([os.getpid()] * 3 + [holder.pid] * 2)
        assert pids == {holder.pid, sender.pid}

        text = _monitor(namespace, "--once")
        assert text.returncode == 0, text.stderr
        for expected in ("alpha", "beta", f"registry pid {view['registry']['pid']}", "2 feeds  5 channels",
                         "1 blocked senders", str(sender.pid), "████████████"):
            assert expected in text.stdout, expected
    finally:
        os.kill(sender.pid, signal.SIGKILL)
        sender.join(10)
        stop.put("stop")
        holder.join(30)
    del alpha_sub, spare


def test_no_namespace_is_a_clear_error(namespace):
    result = _monitor(namespace + "-nothing", "--once")
    assert result.returncode == 1
    assert "has no registry and nothing in /dev/shm" in result.stderr


def _read_screen(master: int, seconds: float) -> str:
    chunks, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunks.append(os.read(master, 65536).decode(errors="replace"))
            except OSError:
                break
    return "".join(chunks)


def test_the_live_view_refreshes_with_rates_and_quits_on_q(mp_context, namespace):
    live_feed = shmfeed.Feed("live")
    channel = shmfeed.Channel(capacity=64, overflow="drop_oldest")
    live_feed.subscribe(channel)
    ready, stop = shmfeed.Channel(), shmfeed.Channel()
    streamer = mp_context.Process(target=W.stream, args=(namespace, ready, stop))
    streamer.start()
    ready.recv(timeout=30)
    pid, master = pty.fork()
    if pid == 0:  # the child: the monitor in a real terminal
        os.environ["COLUMNS"], os.environ["LINES"] = "140", "50"
        os.execv(sys.executable, [sys.executable, "-m", "shmfeed._cli", "monitor", "--namespace", namespace,
                                  "--interval", "0.3"])
    try:
        screen = _read_screen(master, 3.0)
        assert "shmfeed monitor" in screen and "live" in screen
        rates = [line for line in screen.splitlines() if "live" in line and "│" in line]
        assert rates, screen[-2000:]
        last_rate = rates[-1].split("│")[-2].strip().replace(",", "")
        assert last_rate.isdigit() and int(last_rate) > 0, rates[-1]
        os.write(master, b"q")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(master)
        stop.send("stop")
        streamer.join(30)
