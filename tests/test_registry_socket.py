"""The registry's socket: a slow, silent or flooding client delays neither other clients nor
the recovery after a death, and only a peer of our own user is let in."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterator

import msgpack
import pytest

import _kill_workers as K
import shmfeed
from shmfeed import _registry, _registry_client

pytestmark = pytest.mark.timeout(60)

DRIBBLE_EVERY = 0.5  # seconds between a slow client's bytes
DRIBBLE_FOR = 3.0  # how long it goes on (longer than the registry's CLIENT_SECONDS)
PING_BOUND = 0.5  # a ping answered while others stall: well under a second
NOBODY = 65534


def _ping_frame() -> bytes:
    body = msgpack.packb({"op": "ping"}, use_bin_type=True)
    return _registry_client.FRAME.pack(len(body)) + body


def _connect(namespace: str) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(_registry_client.socket_path(namespace))  # blocking: waits for room in the backlog
    connection.settimeout(10)
    return connection


def _timed_ping(namespace: str) -> float:
    """Seconds one ping took to be answered (it must be answered)."""
    started = time.monotonic()
    answer = _registry_client.request(namespace, {"op": "ping"}, timeout=10)
    assert answer["ok"], answer
    return time.monotonic() - started


def _closed_by_peer(connection: socket.socket, timeout: float) -> bool:
    """True if the other end closed the connection within ``timeout`` without a byte sent."""
    connection.settimeout(timeout)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class Dribbler(threading.Thread):
    """A client that sends a ping request one byte every ``DRIBBLE_EVERY`` seconds for
    ``DRIBBLE_FOR`` seconds, and notes when the registry closed on it."""

    def __init__(self, namespace: str) -> None:
        super().__init__(daemon=True)
        self.connection = _connect(namespace)
        self.started = threading.Event()  # two bytes are in: the registry holds the connection
        self.began = self.closed_after = 0.0
        self.closed = False

    def run(self) -> None:
        self.began = time.monotonic()
        with self.connection:
            for index, byte in enumerate(_ping_frame()):
                if time.monotonic() - self.began > DRIBBLE_FOR:
                    break
                try:
                    self.connection.send(bytes([byte]))
                except OSError:  # the registry closed on us
                    self.closed, self.closed_after = True, time.monotonic() - self.began
                    break
                if index == 1:
                    self.started.set()
                time.sleep(DRIBBLE_EVERY)  # the slowness is the point of this client
        self.started.set()


@contextlib.contextmanager
def _lock_holder(namespace: str, channel: shmfeed.Channel) -> Iterator[Any]:
    """A child holding the channel's send lock, watched by the registry, until it is killed."""
    context = multiprocessing.get_context("fork")  # started before this test starts threads
    reader, writer = context.Pipe(duplex=False)
    with K.running(context, (K.hold_channel_lock, (namespace, channel, True, writer))) as (child,):
        K.premise(reader.poll(30) and reader.recv() == child.pid, "the child holds the channel's lock")
        K.wait_watched(namespace, child.pid)
        yield child


def _seconds_to_proceed(channel: shmfeed.Channel, pid: int) -> float:
    """Kill ``pid`` (holding the channel's send lock); seconds until a send goes through."""
    killed_at = K.kill(pid)
    channel.send("after the kill", timeout=10)
    proceeded = time.monotonic() - killed_at
    assert channel.recv(timeout=5) == "after the kill"
    return proceeded


def test_a_dribbling_client_delays_neither_pings_nor_recovery(namespace):
    channel = shmfeed.Channel(capacity=4)
    K.registry_pid(namespace)
    with _lock_holder(namespace, channel) as child:
        dribbler = Dribbler(namespace)
        dribbler.start()
        K.premise(dribbler.started.wait(10) and not dribbler.closed, "the slow client sent its first bytes")
        for _ in range(3):
            assert _timed_ping(namespace) < PING_BOUND, "a ping waited for the slow client"
        proceeded = _seconds_to_proceed(channel, child.pid)
        assert proceeded < K.PROCEED_BOUND, f"recovery took {proceeded:.2f} s"
        K.premise(dribbler.is_alive(), "the kill happened while the slow client was still sending")
        while dribbler.is_alive():
            assert _timed_ping(namespace) < PING_BOUND, "a ping waited for the slow client"
    dribbler.join(DRIBBLE_FOR + 5)
    assert dribbler.closed, "the registry let a client dribble past its deadline"
    assert dribbler.closed_after < _registry.CLIENT_SECONDS + DRIBBLE_EVERY + 0.5


def test_a_flood_of_connections_is_capped_and_wedges_nothing(namespace):
    channel = shmfeed.Channel(capacity=4)
    K.registry_pid(namespace)
    with _lock_holder(namespace, channel) as child:
        flood = [_connect(namespace) for _ in range(_registry.MAX_CLIENTS - 1)]
        try:
            for connection in flood:
                connection.sendall(_ping_frame()[:1])  # and then nothing: stalled mid-request
            assert _timed_ping(namespace) < PING_BOUND, "a ping with one place left"
            flood.append(_connect(namespace))  # the cap reached
            beyond = _connect(namespace)
            with beyond:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused already
                    beyond.sendall(_ping_frame())
                assert _closed_by_peer(beyond, PING_BOUND), "a connection beyond the cap was not refused at once"
            proceeded = _seconds_to_proceed(channel, child.pid)
            assert proceeded < K.PROCEED_BOUND, f"recovery during the flood took {proceeded:.2f} s"
            # The flood's time runs out by itself: every one of them closed, pings served again.
            assert all(_closed_by_peer(c, _registry.CLIENT_SECONDS + 2) for c in flood)
            assert _timed_ping(namespace) < PING_BOUND
        finally:
            for connection in flood:
                connection.close()


@pytest.fixture
def bare_registry(namespace: str) -> Iterator[_registry.Registry]:
    """A Registry object whose loop does not run, listening in a directory anyone may enter."""
    directory = tempfile.mkdtemp(prefix="shmfeed-peer-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "registry.sock")
    registry = _registry.Registry(namespace, idle_seconds=1)
    registry.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    registry.listener.bind(path)
    os.chmod(path, 0o777)
    registry.listener.listen(4)
    registry.listener.setblocking(False)
    try:
        yield registry
    finally:
        for client in list(registry.clients):
            registry._drop(client)
        registry.listener.close()
        registry.selector.close()
        shutil.rmtree(directory)


def _accept_one(registry: _registry.Registry) -> None:
    assert registry.listener is not None
    ready, _, _ = select.select([registry.listener], [], [], 30)
    K.premise(ready, "a client connected")
    registry._accept()


def test_a_peer_whose_credentials_cannot_be_read_is_refused(bare_registry, monkeypatch):
    getsockopt = socket.socket.getsockopt

    def no_credentials(self: socket.socket, *args: Any) -> Any:
        if args[:2] == (socket.SOL_SOCKET, socket.SO_PEERCRED):
            raise OSError("SO_PEERCRED failed")
        return getsockopt(self, *args)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(bare_registry.listener.getsockname())
        monkeypatch.setattr(socket.socket, "getsockopt", no_credentials)
        _accept_one(bare_registry)
        monkeypatch.undo()
        assert not bare_registry.clients
        assert _closed_by_peer(client, 5)


def test_a_peer_of_our_own_user_is_let_in_and_answered(bare_registry):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(bare_registry.listener.getsockname())
        client.sendall(_ping_frame())
        _accept_one(bare_registry)
        (served,) = bare_registry.clients
        K.wait_until(lambda: select.select([served.connection], [], [], 0)[0], 10, "the request arriving")
        bare_registry._serve(served)
        client.settimeout(10)
        assert msgpack.unpackb(client.recv(65536)[_registry_client.FRAME.size:])["ok"] is True
    assert not bare_registry.clients


_OTHER_USER_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2]))
print("ready", flush=True)
try:
    print("answered" if s.recv(1) else "refused")
except ConnectionResetError:
    print("refused")
except socket.timeout:
    print("left waiting")
"""


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as another user")
def test_a_peer_of_another_user_is_refused(bare_registry, other_user_turn):
    path = bare_registry.listener.getsockname()
    client = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
         _OTHER_USER_CLIENT, path, _ping_frame().hex()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert client.stdout is not None
        K.premise(client.stdout.readline().strip() == "ready", "the other user connected")
        _accept_one(bare_registry)
        assert not bare_registry.clients
        output, errors = client.communicate(timeout=30)
        assert client.returncode == 0, errors
        assert output.strip() == "refused"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
