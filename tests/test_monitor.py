"""shmfeed monitor: --json and --once on a known scene, and the live view in a terminal."""

from __future__ import annotations

import json
import multiprocessing
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
from shmfeed import _gc
from shmfeed import _layout as L
from shmfeed import _monitor as monitor_module
from shmfeed.testing import wait_until

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
                         "1 blocked senders", str(sender.pid), "4/4 │ ████████"):
            assert expected in text.stdout, expected
    finally:
        os.kill(sender.pid, signal.SIGKILL)
        sender.join(10)
        stop.put("stop")
        holder.join(30)
    del alpha_sub, spare


# Names as another process can write them straight into shared memory (the library refuses
# unprintable names, a hostile writer does not ask): terminal escapes (set the window title,
# clear the screen, CSI as one C1 byte) and rich markup.
HOSTILE_FEED = "\x1b]0;owned\x07[red]F[/red]"
HOSTILE_TYPE = "\x9b2J[bold]T"
HOSTILE_SCOPE = "\x1b[2J[link=https://e.x]S[/link]"
HOSTILE_LABEL = "\x1b[2K[red]L[/red]\x07"
HOSTILE_COMM = b"\x1b[5m[blink]P\x7f"  # a process name: up to 15 bytes of anything


def _write_name(words, buffer, length_word: int, offset: int, text: str) -> None:
    words[length_word] = L.write_text(buffer, offset, L.FEED_NAME_MAX, text)


def _is_control(character: str) -> bool:
    return ord(character) < 0x20 or 0x7F <= ord(character) <= 0x9F


def test_once_shows_hostile_names_literally_and_without_control_characters(namespace):
    feed = shmfeed.Feed("placeholder")
    core = feed._open()
    _write_name(core.words, core.buffer, L.NAME_LEN, L.FEED_NAME_OFFSET, HOSTILE_FEED)
    _write_name(core.words, core.buffer, L.FEED_TYPE_LEN, L.TYPE_NAME_OFFSET, HOSTILE_TYPE)
    scope = shmfeed.SubscriptionScope("placeholder")
    shared = scope._shared
    _write_name(shared.words, shared.buffer, L.SCOPE_NAME_LEN, L.FEED_NAME_OFFSET, HOSTILE_SCOPE)
    labelled = shmfeed.Channel(8, name="placeholder")
    channel_core = labelled._live_core()
    channel_core.words[L.CHANNEL_NAME_LEN] = L.write_text(channel_core.buffer, L.CHANNEL_NAME_OFFSET,
                                                          L.CHANNEL_NAME_MAX, HOSTILE_LABEL)
    context = multiprocessing.get_context("fork")  # any start method: the name is what is tested
    ready, stop = context.SimpleQueue(), context.SimpleQueue()
    holder = context.Process(target=W.hold_channel_under_name, args=(namespace, HOSTILE_COMM, ready, stop))
    holder.start()
    try:
        assert ready.get() == holder.pid
        result = _monitor(namespace, "--once")
        assert result.returncode == 0, result.stderr
        shown = result.stdout
        assert not [c for c in shown if _is_control(c) and c != "\n"], "a control character reached the terminal"
        for literal in ("\\x1b]0;owned\\x07[red]F[/red]", "\\x9b2J[bold]T", "\\x1b[2J[link=https://e.x]S[/link]",
                        "\\x1b[5m[bl",  # the owner column gets what the others leave: it cuts the name
                        "\\x1b[2K[red]L"):  # the channel column cuts the label at 20 characters
            assert literal in shown, f"{literal!r} not shown as written:\n{shown}"
        as_json = json.loads(_monitor(namespace, "--json").stdout)  # raw: JSON escapes them itself
        assert [f["name"] for f in as_json["feeds"]] == [HOSTILE_FEED]
        assert [s["name"] for s in as_json["scopes"]] == [HOSTILE_SCOPE]
        assert HOSTILE_LABEL in [c["name"] for c in as_json["channels"]]
    finally:
        stop.put("stop")
        holder.join(30)
    del feed, scope, labelled


def test_untrusted_text_escapes_every_control_character_and_no_markup():
    controls = "".join(map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0)]))
    text = monitor_module.untrusted_text(f"a{controls}é█[red]z[/red]")
    assert text.plain == "a" + "".join(f"\\x{ord(c):02x}" for c in controls) + "é█[red]z[/red]"
    assert not text.spans and not text.style  # rich applied nothing
    assert monitor_module.untrusted_text("evil\u202egnp.exe\u200b").plain == "evil\\u202egnp.exe\\u200b"


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


# The live view is the monitor's own loop: one start method for the traffic it watches (the
# other tests here cover all three).
@pytest.mark.parametrize("mp_context", ["spawn"], indirect=True)
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


def test_the_slow_labelled_reader_and_the_blocked_sender_are_on_screen(mp_context, namespace):
    # A labelled channel whose one reader took 3 values and stopped (the slow reader), a
    # process that holds it without reading, and a sender blocked on it once it is full.
    feed = shmfeed.Feed("ticks")
    slow = shmfeed.Channel(8, name="ticks-worker-3")
    sub = feed.subscribe(slow)
    ready, stop = mp_context.SimpleQueue(), mp_context.SimpleQueue()
    idle = mp_context.Process(target=W.hold_without_reading, args=(namespace, slow, ready, stop))
    sender = mp_context.Process(target=W.send_until_blocked, args=(namespace, ready, "ticks"))
    reader = mp_context.Process(target=W.read_slowly, args=(namespace, slow, 3, ready, stop))
    try:
        idle.start()
        assert ready.get() == (idle.pid, "ticks-worker-3")  # the label travels with the channel
        sender.start()
        assert ready.get() == sender.pid
        reader.start()
        assert ready.get() == reader.pid
        wait_until(lambda: slow.statistics().waiting_senders == 1, 30, "the sender blocked on the full channel")
        view = json.loads(_monitor(namespace, "--json").stdout)
        assert view["schema"] == 4
        (channel,) = view["channels"]
        assert channel["name"] == "ticks-worker-3" and channel["id"] == f"{slow._channel_id:016x}"
        assert channel["waiting_senders"] == [sender.pid]
        assert [r["pid"] for r in channel["readers"]] == [reader.pid] and channel["readers"][0]["alive"]
        assert {p["pid"] for p in channel["holders"]} >= {os.getpid(), idle.pid, reader.pid}  # holders, not readers

        text = _monitor(namespace, "--once")
        assert text.returncode == 0, text.stderr
        row = next((line for line in text.stdout.splitlines() if "ticks-worker-3" in line), "")
        assert f"{slow._channel_id:016x}"[:8] in row, text.stdout
        assert str(sender.pid) in row, text.stdout  # senders waiting
        assert f"{reader.pid} " in row.split("│")[-2], text.stdout  # readers (last read)
        assert str(idle.pid) not in row, text.stdout
        assert "1 blocked senders" in text.stdout
    finally:
        if sender.pid is not None:
            os.kill(sender.pid, signal.SIGKILL)
            sender.join(10)
        for process in (idle, reader):
            if process.pid is not None:
                stop.put("stop")
        for process in (idle, reader):
            if process.pid is not None:
                process.join(30)
    del sub


LEAVE_CHANNELS = """
import sys, shmfeed
channels = [shmfeed.Channel(4, name=f"left-{i}") for i in range(5)]
print("ready", flush=True)
sys.stdin.read()
"""


def test_after_a_kill_with_no_registry_it_says_so_and_counts_every_leftover(namespace, monkeypatch):
    monkeypatch.setenv("SHMFEED_NO_REGISTRY", "1")  # as after every process was killed, the registry too
    child = subprocess.Popen([sys.executable, "-c", LEAVE_CHANNELS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline() == "ready\n"
    finally:
        child.kill()
        child.wait(10)
        child.stdin.close()
        child.stdout.close()
    try:
        shown = _monitor(namespace, "--once")
        assert shown.returncode == 0, shown.stderr
        leftovers = json.loads(_monitor(namespace, "--json").stdout)["leftovers"]
        assert len(leftovers) == 20  # 5 segments, 3 locks each
        assert "registry: not running" in shown.stdout
        assert f"dead: {child.pid} (no registry runs: `shmfeed gc` removes what they left)" in shown.stdout
        assert "the registry cleans up" not in shown.stdout
        assert shown.stdout.count("leftover: ") == monitor_module.LEFTOVERS_SHOWN
        assert f"… and {20 - monitor_module.LEFTOVERS_SHOWN} more leftover(s) (20 in all" in shown.stdout
        removed = subprocess.run([sys.executable, "-m", "shmfeed._cli", "gc", "--namespace", namespace],
                                 capture_output=True, text=True, timeout=60)
        assert "removed 20 leftover(s)" in removed.stdout, removed.stdout
    finally:
        _gc.sweep(namespace)  # a failed assertion above must not leave the child's objects
