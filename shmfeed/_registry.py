"""The registry process of one namespace: the control plane's watchdog.

It holds the namespace's registry lock for its whole life (exactly one runs), and:

- watches every process that uses the namespace: it finds them in the attach slots of the
  segments (scanning every ``SCAN_SECONDS``) and waits on a pidfd for each, so a death —
  SIGKILL included — is noticed at once;
- after a death, runs a recovery pass (``_recovery``): locks released, subscriptions ended,
  senders released, segments unlinked once no live process uses them;
- every ``LEFTOVER_SECONDS``, also runs one if ``shmfeed gc`` would find something to
  remove: leftovers no death points to, such as lock semaphores that no segment names any
  more (a creation killed half-way, a segment overwritten), once their grace period is over;
- answers queries on its unix socket (``ping``, ``recover``, ``snapshot``) from processes
  of its own user only, without ever blocking on one: every connection is read and written
  by the same non-blocking loop that watches the pidfds, has ``CLIENT_SECONDS`` for its
  whole exchange, and at most ``MAX_CLIENTS`` are open at once (more are refused), so a
  slow or stalled client delays neither other clients nor a recovery pass;
- exits once the namespace has had nothing of the library's in /dev/shm for
  ``idle_seconds`` (names it does not recognise, or files of other users, do not count:
  nothing can be done about them, and they must not keep it alive for good).

It keeps no state that matters: a registry killed at any point is replaced by the next
use, and the new one rebuilds everything from shared memory.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any, cast

from . import _gc
from . import _layout as L
from . import _kept_bridge, _names, _process, _recovery, _registry_client

SCAN_SECONDS = 0.25
LEFTOVER_SECONDS = 1.0  # a sweep without removing costs about as much as a scan
DEFAULT_IDLE_SECONDS = 2.0
MAX_CLIENTS = 32  # connections open at once; one more is closed at once, unanswered
CLIENT_SECONDS = 2.0  # a connection's whole exchange, from accept to the answer's last byte
MAX_REQUEST_BYTES = 64 * 1024  # a request is a small map; a longer frame is refused
RECV_BYTES = 65536
BACKLOG = 128  # connections waiting to be accepted: a full backlog fails a connect at once
PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class _Client:
    """One connection to the registry: its request read and its answer written piecewise,
    as the socket allows, never waiting for it."""

    def __init__(self, connection: socket.socket, deadline: float) -> None:
        self.connection = connection
        self.deadline = deadline  # monotonic; the connection is closed then, done or not
        self.received = bytearray()
        self.unsent: memoryview | None = None  # the answer, once there is one

    def receive(self) -> Any | None:
        """Read what has arrived; the request once it is whole, else None.

        Raises:
            ValueError: the request is malformed, too long, or the client closed mid-frame.
            OSError: the connection failed.
        """
        try:
            chunk = self.connection.recv(RECV_BYTES)
        except BlockingIOError:
            return None
        if not chunk:
            raise ValueError("connection closed before a whole request")
        self.received += chunk
        size = self._frame_size()
        if size is None or len(self.received) < size:
            return None
        return _registry_client.read_frame(_Bytes(bytes(self.received[:size])).as_socket())

    def _frame_size(self) -> int | None:
        """The request's size with its header, once the header is in."""
        header = _registry_client.FRAME
        if len(self.received) < header.size:
            return None
        (length,) = header.unpack_from(self.received)
        if length > MAX_REQUEST_BYTES:
            raise ValueError(f"request of {length} bytes is too long")
        return header.size + length

    def start_answer(self, answer: dict[str, Any]) -> None:
        sink = _Bytes(b"")
        _registry_client.write_frame(sink.as_socket(), answer)
        self.unsent = memoryview(sink.data)

    def send(self) -> bool:
        """Write as much of the answer as the socket takes now; True once all is written.

        Raises:
            OSError: the connection failed (the client left).
        """
        assert self.unsent is not None
        try:
            sent = self.connection.send(self.unsent)
        except BlockingIOError:
            return False
        self.unsent = self.unsent[sent:]
        return not self.unsent


class _Bytes:
    """A socket stand-in over bytes, so that frames are read and written by the client
    module's own ``read_frame`` and ``write_frame`` (the protocol has one owner)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def as_socket(self) -> socket.socket:
        """Typed as the socket the frame functions take: they call only recv and sendall."""
        return cast(socket.socket, self)

    def recv(self, size: int) -> bytes:
        chunk, self.data = self.data[:size], self.data[size:]
        return chunk

    def sendall(self, data: bytes) -> None:
        self.data += data


class Registry:
    def __init__(self, namespace: str, idle_seconds: float) -> None:
        self.namespace = namespace
        self.idle_seconds = idle_seconds
        self.started = time.time()
        self.selector = selectors.DefaultSelector()
        self.watched: dict[int, int] = {}  # pid -> pidfd
        self.listener: socket.socket | None = None
        self.clients: set[_Client] = set()
        self.passes = 0
        self.last_repairs: list[str] = []
        self.stopping = False
        self.suspects: dict[tuple[str, int], int] = {}
        self.processes: set[tuple[int, int]] = set()  # found in the segments at the last scan
        self.reported_owners: set[tuple[str, int]] = set()  # dead lock holders a pass saw
        self.bridge = _kept_bridge.KeptBridge.from_environment(namespace)  # SHMFEED_BRIDGE_URL
        self.bridge_retired = False  # stopped because it was the namespace's only user

    # --- life ---------------------------------------------------------------------------

    def run(self, startup_fd: int | None = None) -> int:
        lock = self._take_lock()
        if startup_fd is not None:
            os.close(startup_fd)  # let other processes see the outcome
        if lock is None:
            return 0  # another registry runs: fine, exactly one does
        try:
            self._listen()
            self._loop()
        finally:
            self._close()
            os.close(lock)
        return 0

    def _take_lock(self) -> int | None:
        path = _registry_client.lock_path(self.namespace)
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(descriptor)
                return None
            # A registry leaving unlinks the file: make sure we locked the file that is there.
            try:
                if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                    return descriptor
            except FileNotFoundError:
                pass
            os.close(descriptor)

    def _listen(self) -> None:
        path = _registry_client.socket_path(self.namespace)
        temporary = f"{path}.{os.getpid()}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        listener.bind(temporary)
        os.chmod(temporary, 0o600)
        listener.listen(BACKLOG)
        os.replace(temporary, path)  # a stale socket of a dead registry goes away here
        listener.setblocking(False)
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, ("listener", None))

    def _close(self) -> None:
        path = _registry_client.socket_path(self.namespace)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        for leftover in (_registry_client.lock_path(self.namespace), _registry_client.startup_lock_path(self.namespace)):
            try:
                os.unlink(leftover)  # safe: a racing client at worst spawns a registry that exits
            except FileNotFoundError:
                pass
        if self.listener is not None:
            self.listener.close()
        for client in list(self.clients):
            self._drop(client)
        for pidfd in self.watched.values():
            os.close(pidfd)
        self._stop_bridge()

    def _loop(self) -> None:
        idle_since: float | None = None
        next_scan = next_leftover_check = 0.0
        while not self.stopping:
            self._keep_bridge()
            wake_at = min([next_scan] + [client.deadline for client in self.clients])
            deaths = False
            for key, _ in self.selector.select(max(0.0, wake_at - time.monotonic())):
                kind, value = key.data
                if kind == "bridge":
                    self.selector.unregister(key.fd)
                    value.exited()
                elif kind == "pid":
                    self._unwatch(value)
                    deaths = True
                elif kind == "listener":
                    self._accept()
                else:
                    self._serve(value)
            if deaths:
                self.recover()
            self._expire_clients()
            if time.monotonic() >= next_scan:
                next_scan = time.monotonic() + SCAN_SECONDS
                leftover_check = time.monotonic() >= next_leftover_check
                if leftover_check:
                    next_leftover_check = time.monotonic() + LEFTOVER_SECONDS
                if self._scan() or self.suspects or (leftover_check and self._leftovers()):
                    self.recover()
                if self._busy():
                    idle_since = None
                    if self.bridge_retired:  # used again: its bridge comes back
                        self.bridge_retired = False
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= self.idle_seconds:
                    if self.bridge is not None and self.bridge.pid is not None:
                        self._stop_bridge()  # it was the only user: now its objects go too
                        self.bridge_retired = True
                        idle_since = None
                        continue
                    return

    def _busy(self) -> bool:
        """Whether the namespace is in use: objects in /dev/shm, and some process using
        them other than the bridge the registry keeps."""
        if not _gc.own_entries(self.namespace):
            return False
        bridge_pid = None if self.bridge is None else self.bridge.pid
        return bridge_pid is None or any(pid != bridge_pid for pid, _ in self.processes)

    def _keep_bridge(self) -> None:
        """Start the kept bridge when it is due (not running, not retired, backoff over)."""
        bridge = self.bridge
        if bridge is None or bridge.pid is not None or self.bridge_retired or self.stopping:
            return
        if time.monotonic() < bridge.restart_at:
            return
        try:
            pidfd = bridge.start()
        except OSError:
            bridge.exited()  # tried again after the backoff
            return
        self.selector.register(pidfd, selectors.EVENT_READ, ("bridge", bridge))

    def _stop_bridge(self) -> None:
        bridge = self.bridge
        if bridge is None:
            return
        if bridge.pidfd is not None:
            self.selector.unregister(bridge.pidfd)
        bridge.stop()

    # --- watching processes -----------------------------------------------------------------

    def _scan(self) -> bool:
        """Watch every process found in the segments; True if one of them is already dead."""
        processes, orphans, owners = self._processes_in_segments()
        self.processes = processes
        found_dead = orphans  # a segment nobody is attached to: its last user died leaving it
        found_dead = self._watch_lock_owners(owners, processes) or found_dead
        for pid, ticks in processes:
            if pid in self.watched or pid == os.getpid():
                continue
            if not _process.is_alive(pid, ticks):
                found_dead = True
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                found_dead = True
                continue
            if not _process.is_alive(pid, ticks):  # the pid was reused before we opened it
                os.close(pidfd)
                found_dead = True
                continue
            self.watched[pid] = pidfd
            self.selector.register(pidfd, selectors.EVENT_READ, ("pid", pid))
        return found_dead

    def _processes_in_segments(self) -> tuple[set[tuple[int, int]], bool, set[tuple[str, int]]]:
        """The processes in the segments' slots and those whose wakers are left, whether
        some segment has none, and the (segment, pid) of each lock held."""
        found: set[tuple[int, int]] = set()
        owners: set[tuple[str, int]] = set()
        orphans = False
        for entry in _gc.own_entries(self.namespace):
            if entry.kind is _names.EntryKind.WAKER:  # its pid is in its name
                found.add((entry.pid, 0))
            elif entry.kind in _names.SEGMENT_ENTRY_KINDS:
                slots, holders = _read_users(entry.path)
                orphans = orphans or not slots
                found.update(slots)
                owners.update((entry.path, pid) for pid in holders)
        return found, orphans, owners

    def _watch_lock_owners(self, owners: set[tuple[str, int]], processes: set[tuple[int, int]]) -> bool:
        """Whether a lock's holder died outside every attach slot; live such holders are
        added to ``processes`` to be watched.

        A daemon thread left its slot and still held the lock when its process exited
        (``os._exit`` stops it anywhere): no slot names that process, so only its pid in
        the owner word tells of a death. Each (segment, pid) counts as news once: a pass
        that finds the lock free already leaves the stale word as it is.
        """
        in_slots = {pid for pid, _ in processes}
        news = False
        for key in owners - self.reported_owners:
            pid = key[1]
            if pid in in_slots or pid in self.watched or pid == os.getpid():
                continue
            ticks = _process.start_ticks(pid)
            if ticks is None:
                self.reported_owners.add(key)
                news = True
            else:
                processes.add((pid, ticks))
        self.reported_owners &= owners
        return news

    def _leftovers(self) -> bool:
        """Whether the namespace holds something ``shmfeed gc`` would remove."""
        return bool(_gc.sweep(self.namespace, remove=False).all())

    def _unwatch(self, pid: int) -> None:
        pidfd = self.watched.pop(pid, None)
        if pidfd is not None:
            self.selector.unregister(pidfd)
            os.close(pidfd)

    def recover(self) -> _recovery.Repairs:
        repairs = _recovery.recover_namespace(self.namespace, _recovery.Liveness(self.suspects))
        self.passes += 1
        if repairs:
            self.last_repairs = (repairs.released_locks + repairs.destroyed + repairs.removed_files)[-50:]
        return repairs

    # --- queries ---------------------------------------------------------------------------

    def _accept(self) -> None:
        """Take one connection: refused (closed unanswered) unless it comes from our own user
        and fewer than ``MAX_CLIENTS`` are open."""
        assert self.listener is not None
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        if not _peer_is_owner(connection) or len(self.clients) >= MAX_CLIENTS:
            connection.close()
            return
        connection.setblocking(False)
        client = _Client(connection, time.monotonic() + CLIENT_SECONDS)
        self.clients.add(client)
        self.selector.register(connection, selectors.EVENT_READ, ("client", client))

    def _serve(self, client: _Client) -> None:
        """Move one client's exchange on by what its socket allows now, without waiting.

        The answer is made here, in the loop's thread, so requests are served one after the
        other and between recovery passes, as they touch the same shared state.
        """
        try:
            if client.unsent is None:
                request = client.receive()
                if request is None:
                    return
                client.start_answer(self._safe_answer(request))
            if not client.send():
                self.selector.modify(client.connection, selectors.EVENT_WRITE, ("client", client))
                return
        except (OSError, ValueError):
            pass
        self._drop(client)

    def _safe_answer(self, message: Any) -> dict[str, Any]:
        """``answer``, with a failure inside it an error answer rather than the registry's end."""
        try:
            return self.answer(message)
        except Exception as error:  # noqa: BLE001 - the watchdog outlives a bad query
            return {"ok": False, "error": f"{type(error).__name__}: {error}"}

    def _expire_clients(self) -> None:
        """Close every connection whose deadline has passed, whatever it was doing."""
        now = time.monotonic()
        for client in [client for client in self.clients if client.deadline <= now]:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        self.clients.discard(client)
        try:
            self.selector.unregister(client.connection)
        except (KeyError, ValueError):
            pass
        client.connection.close()

    def answer(self, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            return {"ok": False, "error": "a request is a map with an 'op' string"}
        op = message["op"]
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "started": self.started, "namespace": self.namespace,
                    "bridge_pid": None if self.bridge is None else self.bridge.pid}
        if op == "recover":
            repairs = self.recover()
            return {"ok": True, "released_locks": repairs.released_locks, "destroyed": repairs.destroyed,
                    "removed": repairs.removed_files, "ended": repairs.ended_subscriptions,
                    "failed": repairs.failed_subscriptions}
        if op == "snapshot":
            from . import _inspect

            return {"ok": True, "pid": os.getpid(), "started": self.started, "watched": sorted(self.watched),
                    "passes": self.passes, "last_repairs": self.last_repairs,
                    "namespace_state": _inspect.snapshot(self.namespace)}
        return {"ok": False, "error": f"unknown op {op!r}"}


def _read_users(path: str) -> tuple[set[tuple[int, int]], set[int]]:
    """(pid, ticks) of a segment's attach slots (a feed's senders are among them), and the
    pids in its locks' owner words."""
    try:
        mapped = _gc.map_segment(path)
    except (OSError, ValueError):
        return set(), set()
    if mapped is None:
        return set(), set()
    mapping, size = mapped
    try:
        words = memoryview(mapping).cast("Q")
        try:
            if words[L.DESTROYED]:
                return set(), set()  # being destroyed, or its destroyer died half-way
            kind = L.segment_kind(words, size)
            locks = kind.locks if kind is not None else ()
            holders = {int(words[lock.owner_word]) for lock in locks} - {0}
            return set(L.attached_processes(words)), {pid for pid in holders if pid <= L.SLOT_PID_MASK}
        finally:
            words.release()
    finally:
        mapping.close()


def _peer_is_owner(connection: socket.socket) -> bool:
    """Whether the peer runs as our user; False too if the kernel cannot tell (only the
    namespace's owner may talk to its registry)."""
    try:
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size)
        _, uid, _ = PEER_CREDENTIALS.unpack(credentials)
    except (OSError, struct.error):
        return False
    return bool(uid == os.getuid())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shmfeed registry", description="Run a namespace's registry.")
    parser.add_argument("--namespace", help="namespace (default: $SHMFEED_NAMESPACE or one per user)")
    parser.add_argument("--idle", type=float, default=None, help="exit after this many idle seconds")
    parser.add_argument("--forever", action="store_true", help="do not exit when idle")
    parser.add_argument("--startup-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--detach", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.detach and os.fork() != 0:
        os._exit(0)  # the process that started us reaps this one; the registry runs on
    _registry_client.disabled = True
    namespace = args.namespace or _names.current_namespace()
    idle = float("inf") if args.forever else (
        args.idle if args.idle is not None else float(os.environ.get("SHMFEED_REGISTRY_IDLE", DEFAULT_IDLE_SECONDS))
    )
    registry = Registry(namespace, idle)
    signal.signal(signal.SIGTERM, lambda *_: setattr(registry, "stopping", True))
    return registry.run(args.startup_fd)


if __name__ == "__main__":
    sys.exit(main())
