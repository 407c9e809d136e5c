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
- answers queries on its unix socket (``ping``, ``recover``, ``snapshot``);
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
import sys
import time
from typing import Any

from . import _gc
from . import _layout as L
from . import _names, _process, _recovery, _registry_client

SCAN_SECONDS = 0.25
LEFTOVER_SECONDS = 1.0  # a sweep without removing costs about as much as a scan
DEFAULT_IDLE_SECONDS = 2.0


class Registry:
    def __init__(self, namespace: str, idle_seconds: float) -> None:
        self.namespace = namespace
        self.idle_seconds = idle_seconds
        self.started = time.time()
        self.selector = selectors.DefaultSelector()
        self.watched: dict[int, int] = {}  # pid -> pidfd
        self.listener: socket.socket | None = None
        self.passes = 0
        self.last_repairs: list[str] = []
        self.stopping = False
        self.suspects: dict[tuple[str, int], int] = {}

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
        listener.listen(16)
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
        for pidfd in self.watched.values():
            os.close(pidfd)

    def _loop(self) -> None:
        idle_since: float | None = None
        next_scan = next_leftover_check = 0.0
        while not self.stopping:
            now = time.monotonic()
            timeout = max(0.0, next_scan - now)
            deaths = False
            for key, _ in self.selector.select(timeout):
                kind, value = key.data
                if kind == "pid":
                    self._unwatch(value)
                    deaths = True
                elif kind == "listener":
                    self._accept()
                else:
                    self._serve(key.fileobj)
            if deaths:
                self.recover()
            if time.monotonic() >= next_scan:
                next_scan = time.monotonic() + SCAN_SECONDS
                leftover_check = time.monotonic() >= next_leftover_check
                if leftover_check:
                    next_leftover_check = time.monotonic() + LEFTOVER_SECONDS
                if self._scan() or self.suspects or (leftover_check and self._leftovers()):
                    self.recover()
                if _gc.own_entries(self.namespace):
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= self.idle_seconds:
                    return

    # --- watching processes -----------------------------------------------------------------

    def _scan(self) -> bool:
        """Watch every process found in the segments; True if one of them is already dead."""
        processes, orphans = self._processes_in_segments()
        found_dead = orphans  # a segment nobody is attached to: its last user died leaving it
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

    def _processes_in_segments(self) -> tuple[set[tuple[int, int]], bool]:
        """The processes in the segments' slots and those whose wakers are left, and whether
        some segment has none."""
        found: set[tuple[int, int]] = set()
        orphans = False
        for entry in _gc.own_entries(self.namespace):
            if entry.kind is _names.EntryKind.WAKER:  # its pid is in its name
                found.add((entry.pid, 0))
            elif entry.kind in _names.SEGMENT_ENTRY_KINDS:
                slots = _read_slots(entry.path)
                orphans = orphans or not slots
                found.update(slots)
        return found, orphans

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
        assert self.listener is not None
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        uid = _peer_uid(connection)
        if uid is not None and uid != os.getuid():
            connection.close()  # only the namespace's owner may talk to its registry
            return
        connection.setblocking(True)
        connection.settimeout(2.0)
        self.selector.register(connection, selectors.EVENT_READ, ("client", None))

    def _serve(self, connection: Any) -> None:
        self.selector.unregister(connection)
        try:
            message = _registry_client.read_frame(connection)
            _registry_client.write_frame(connection, self.answer(message))
        except (OSError, ValueError):
            pass
        finally:
            connection.close()

    def answer(self, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            return {"ok": False, "error": "a request is a map with an 'op' string"}
        op = message["op"]
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "started": self.started, "namespace": self.namespace}
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


def _read_slots(path: str) -> set[tuple[int, int]]:
    """(pid, ticks) of a segment's attach slots (a feed's senders are among them)."""
    try:
        mapped = _gc.map_segment(path)
    except (OSError, ValueError):
        return set()
    if mapped is None:
        return set()
    mapping = mapped[0]
    try:
        words = memoryview(mapping).cast("Q")
        try:
            if words[L.DESTROYED]:
                return set()  # being destroyed, or its destroyer died half-way
            return set(L.attached_processes(words))
        finally:
            words.release()
    finally:
        mapping.close()


def _peer_uid(connection: socket.socket) -> int | None:
    try:
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return None
    return int.from_bytes(credentials[8:12], "little")


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
