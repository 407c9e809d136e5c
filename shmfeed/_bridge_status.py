"""Bridge status files: what each running bridge of a namespace says about itself, for
``shmfeed monitor`` (SPEC §7: server, connected, mode, feeds, in/out, dropped, lag).

A bridge runs in its own process, and its counters live in that process (not in shared
memory), so it writes them down: ``StatusPublisher`` writes the bridge's ``statistics()`` as
JSON about once a second to ``<runtime dir>/bridges/<namespace token>-<realm>.json`` and
removes the file when the bridge closes. The runtime directory and ``bridges`` in it are the
user's own, mode 0700 (``_runtime``), so no other user can read a status or plant one; the
namespace appears only as its keyed token (``_names.namespace_token``), as in every other
name. A file is written whole or not at all: a temporary file in the same directory, then
``os.replace``, so a reader sees the old contents or the new.

File contents (one JSON object)::

    pid, start_ticks  the bridge's process (``_process.identity``): a file left by a bridge
                      killed with SIGKILL names a process that is gone (or a reused pid with
                      another start time), and reads as dead
    namespace, realm, origin (the bridge's random id), server (no password or token:
                      ``BridgeStatistics.server`` is redacted), connected, reconnects,
    mode ("core" or "durable"), lag (values a durable bridge is behind, or null), held
    (values a durable bridge's outboxes hold that JetStream has not stored, or null),
    updated (``time.time()`` of the write), feeds_total,
    feeds: [{name, subject, out, in, dropped: {reason: count}}]  (at most MAX_FEEDS)

``read_all`` trusts nothing in a file (another version of shmfeed, a damaged disk, a bug):
the file must pass ``_shm.open_own`` (a regular file of ours, no group or other bits, no
symlink followed, no FIFO waited on), be at most ``MAX_FILE_BYTES``, and every field must
have its type and stay within its bound; anything else is skipped whole. It is read-only:
a dead bridge's file stays until ``stale`` removes it (``shmfeed gc``, and the registry's
recovery passes through ``_gc.sweep``).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from . import _names, _process, _runtime, _shm
from ._errors import ShmfeedError

if TYPE_CHECKING:
    from ._bridge import Bridge

SUBDIRECTORY = "bridges"
INTERVAL_SECONDS = 1.0  # how often a running bridge rewrites its status
MAX_FILE_BYTES = 2 << 20  # a status file over this is not read
MAX_FEEDS = 1024  # feeds written per status file (feeds_total counts them all)
MAX_REASONS = 64  # drop reasons per feed
MAX_FILES = 256  # status files read per namespace
MAX_COUNT = (1 << 63) - 1  # every counter, pid and start time is an int in [0, MAX_COUNT]
MAX_SERVER_LENGTH = 512
_TEXT_LIMITS = {"namespace": _names.MAX_NAMESPACE_LENGTH, "origin": 64, "server": MAX_SERVER_LENGTH, "mode": 16}
_FEED_TEXT_LIMITS = {"name": _names.MAX_OBJECT_NAME_LENGTH, "subject": 160}
_REASON_LENGTH = 32
_REALM = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")  # as _bridge's realm
_FILE_NAME = re.compile(r"([0-9a-f]{12})-([A-Za-z0-9_-]{1,64})\.json\Z")
_TEMPORARY_NAME = re.compile(r"\.([0-9a-f]{12})-[A-Za-z0-9_-]{1,64}\.json\.([0-9]{1,10})\.[0-9a-f]{8}\.tmp\Z")


def status_directory() -> str:
    """``<runtime dir>/bridges``, private (0700, ours; made if missing).

    Raises:
        RegistryUnavailableError: no private runtime directory, or something else is there.
    """
    return _runtime.private_subdirectory(SUBDIRECTORY)


def status_path(namespace: str, realm: str) -> str:
    """Where the bridge of ``namespace`` and ``realm`` writes its status."""
    return os.path.join(status_directory(), f"{_names.namespace_token(namespace)}-{realm}.json")


def _status_of(bridge: Bridge, namespace: str) -> dict[str, Any]:
    """The bridge's statistics now, as the file holds them."""
    statistics = bridge.statistics()
    pid, start_ticks = _process.identity()
    feeds = [{"name": feed.name, "subject": feed.subject, "out": feed.out, "in": feed.in_,
              "dropped": dict(feed.dropped)} for feed in statistics.feeds]
    lag, held = getattr(statistics, "lag", None), getattr(statistics, "held", None)
    return {
        "pid": pid, "start_ticks": start_ticks, "namespace": namespace, "realm": bridge.realm,
        "origin": statistics.origin, "server": statistics.server[:MAX_SERVER_LENGTH],
        "connected": bool(statistics.connected), "reconnects": statistics.reconnects,
        "mode": str(getattr(statistics, "mode", "core")), "lag": None if lag is None else int(lag),
        "held": None if held is None else int(held), "updated": time.time(), "feeds_total": len(feeds), "feeds": feeds[:MAX_FEEDS],
    }


class StatusPublisher:
    """Writes a running bridge's status file every ``INTERVAL_SECONDS`` (its own daemon
    thread) until ``stop()``, which removes it. Writing is best effort: a failure (disk
    full, say) is said once on stderr and tried again at the next interval; the bridge
    itself is never affected."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.namespace = _names.current_namespace()
        self.path: str | None = None
        self._stopping = threading.Event()  # also the timer between writes
        # Held across each write and by stop(): once stop() has removed the file, no write
        # that was under way can bring it back.
        self._write_lock = threading.Lock()
        self._stopped = False
        self._complained = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Write the status once now (it is there when the bridge says ``ready``), then
        every ``INTERVAL_SECONDS`` in a thread."""
        self.write()
        self._thread = threading.Thread(target=self._run, name="shmfeed-bridge-status", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(INTERVAL_SECONDS):  # a timer, not a synchronisation
            self.write()

    def write(self) -> None:
        """Write the status file now (whole, by rename); nothing once stopped."""
        try:
            status = _status_of(self.bridge, self.namespace)
            data = json.dumps(status, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            with self._write_lock:
                if self._stopped:
                    return
                if self.path is None:
                    self.path = status_path(self.namespace, self.bridge.realm)
                _write_whole(self.path, data)
        except Exception as error:  # noqa: BLE001 - the status must never take the bridge down
            if not self._complained:
                self._complained = True
                print(f"shmfeed bridge: cannot write the bridge's status file ({error}); shmfeed monitor does "
                      f"not show this bridge until it can", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Write nothing more and remove the status file. Idempotent."""
        self._stopping.set()
        with self._write_lock:
            self._stopped = True
            path, self.path = self.path, None
        if path is not None:
            _unlink(path)  # if it cannot be: read as dead once this process is gone, and gc removes it
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)


def _write_whole(path: str, data: bytes) -> None:
    """``data`` as the file at ``path``: a private temporary file beside it, renamed over it."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
        finally:
            os.close(descriptor)
        os.replace(temporary, path)  # replaces whatever is at path, a symlink included, never following it
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


# --- reading (the monitor, gc) ------------------------------------------------------------------


def read_all(namespace: str) -> list[dict[str, Any]]:
    """The status of every bridge of ``namespace`` that has a valid status file, sorted by
    realm, each with ``alive`` (its process still runs) and ``age_s`` (seconds since it
    was written). Malformed or foreign files are skipped; never raises."""
    return [status for _, status, _ in _statuses(namespace)]


def durable_lock_path(namespace: str, realm: str) -> str:
    """The file whose lock makes a bridge the one durable bridge of ``namespace`` and
    ``realm`` (see ``_bridge``); the bridge removes it at close."""
    return os.path.join(_runtime.runtime_dir(), f"bridge-{_names.namespace_token(namespace)}-{realm}.lock")


def _free_locks(namespace: str) -> list[str]:
    """Durable bridges' lock files of ``namespace`` that no process holds (their bridge was
    killed before it could remove them). Held or not is read from /proc/locks: taking the
    lock to see would make a bridge starting at that moment think another one runs."""
    prefix = f"bridge-{_names.namespace_token(namespace)}-"
    try:
        directory = _runtime.runtime_dir()
        names = [name for name in os.listdir(directory) if name.startswith(prefix) and name.endswith(".lock")]
    except (OSError, ShmfeedError):
        return []
    if not names:
        return []
    held = _flocked_inodes()
    if held is None:
        return []  # cannot tell: leave them
    found = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if _shm.is_own(path) and (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino) not in held:
            found.append(path)
    return found


def _flocked_inodes() -> set[tuple[int, int, int]] | None:
    """(device major, minor, inode) of every file a flock() lock is held on, from
    /proc/locks; None if it cannot be read."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    held = set()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK":
            device = fields[5].split(":")
            if len(device) == 3:
                try:
                    held.add((int(device[0], 16), int(device[1], 16), int(device[2])))
                except ValueError:
                    continue
    return held


def stale(namespace: str, remove: bool = True) -> list[str]:
    """Status files of ``namespace`` whose bridge is dead (killed before it could remove
    its file), temporary files of writers killed before their rename, and durable bridges'
    lock files nobody holds; with ``remove``, unlinked (those removed are returned)."""
    found = []
    for path in _free_locks(namespace):
        if not remove or _unlink(path):
            found.append(path)
    for path in _dead_temporaries(namespace):
        if not remove or _unlink(path):
            found.append(path)
    for path, status, inode in _statuses(namespace):
        if status["alive"]:
            continue
        if remove:
            try:
                if os.lstat(path).st_ino != inode:
                    continue  # a new bridge replaced it since it was read
                os.unlink(path)
            except OSError:
                continue
        found.append(path)
    return found


def _dead_temporaries(namespace: str) -> list[str]:
    """``_write_whole``'s temporary files of ``namespace`` whose writer is dead."""
    try:
        token = _names.namespace_token(namespace)
        directory = status_directory()
        names = os.listdir(directory)
    except (OSError, ShmfeedError):
        return []
    found = []
    for name in names:
        match = _TEMPORARY_NAME.match(name)
        if match is None or match.group(1) != token or _process.start_ticks(int(match.group(2))) is not None:
            continue
        path = os.path.join(directory, name)
        if _shm.is_own(path):
            found.append(path)
    return found


_unlink = _shm.remove_file


def _statuses(namespace: str) -> list[tuple[str, dict[str, Any], int]]:
    """(path, checked status, inode) of each valid status file of ``namespace``."""
    try:
        token = _names.namespace_token(namespace)
        directory = status_directory()
        names = sorted(os.listdir(directory))
    except (OSError, ShmfeedError):
        return []
    found = []
    for name in names:
        match = _FILE_NAME.match(name)
        if match is None or match.group(1) != token:
            continue
        path = os.path.join(directory, name)
        read = _read(path)
        if read is None:
            continue
        data, inode = read
        status = _checked(data, namespace, match.group(2))
        if status is not None:
            found.append((path, status, inode))
        if len(found) >= MAX_FILES:
            break
    return found


def _read(path: str) -> tuple[bytes, int] | None:
    """The bytes and inode of a status file of ours; None if it is not one (or is too big)."""
    try:
        descriptor, info = _shm.open_own(path)
    except OSError:  # gone, a symlink, a FIFO, another user's file, ...
        return None
    try:
        if info.st_size > MAX_FILE_BYTES:
            return None
        chunks, size = [], 0
        while True:
            chunk = os.read(descriptor, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                return None
        return b"".join(chunks), info.st_ino
    except OSError:
        return None
    finally:
        os.close(descriptor)


def _count(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_COUNT


def _text(value: object, limit: int) -> bool:
    return type(value) is str and len(value) <= limit


def _checked(data: bytes, namespace: str, realm: str) -> dict[str, Any] | None:
    """The status in ``data`` if every field is as a bridge writes it, plus ``alive`` and
    ``age_s``; else None."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if type(raw) is not dict:
        return None
    if not (_count(raw.get("pid")) and raw["pid"] > 0 and _count(raw.get("start_ticks"))
            and not _process.is_fork_reservation(raw["start_ticks"])):
        return None
    if not all(_text(raw.get(key), limit) for key, limit in _TEXT_LIMITS.items()):
        return None
    if raw["namespace"] != namespace or raw.get("realm") != realm or not _REALM.match(realm):
        return None
    if type(raw.get("connected")) is not bool or not _count(raw.get("reconnects")):
        return None
    lag, held, written = raw.get("lag"), raw.get("held"), raw.get("updated")
    if not (lag is None or _count(lag)) or not (held is None or _count(held)):
        return None
    if not isinstance(written, (int, float)) or isinstance(written, bool) or not math.isfinite(written):
        return None
    updated = float(written)
    feeds = raw.get("feeds")
    if type(feeds) is not list or len(feeds) > MAX_FEEDS:
        return None
    checked_feeds = []
    for feed in feeds:
        checked = _checked_feed(feed)
        if checked is None:
            return None
        checked_feeds.append(checked)
    feeds_total = raw.get("feeds_total", len(checked_feeds))
    if not _count(feeds_total) or feeds_total < len(checked_feeds):
        return None
    return {
        "pid": raw["pid"], "start_ticks": raw["start_ticks"], "namespace": namespace, "realm": realm,
        "origin": raw["origin"], "server": raw["server"], "connected": raw["connected"],
        "reconnects": raw["reconnects"], "mode": raw["mode"], "lag": lag, "held": held, "updated": updated,
        "feeds_total": feeds_total, "feeds": checked_feeds,
        "alive": _process.is_alive(raw["pid"], raw["start_ticks"]),
        "age_s": round(max(0.0, time.time() - updated), 1),
    }


def _checked_feed(feed: object) -> dict[str, Any] | None:
    if type(feed) is not dict:
        return None
    if not all(_text(feed.get(key), limit) for key, limit in _FEED_TEXT_LIMITS.items()):
        return None
    if not (_count(feed.get("out")) and _count(feed.get("in"))):
        return None
    dropped = feed.get("dropped")
    if type(dropped) is not dict or len(dropped) > MAX_REASONS:
        return None
    if not all(_text(reason, _REASON_LENGTH) and _count(count) for reason, count in dropped.items()):
        return None
    return {"name": feed["name"], "subject": feed["subject"], "out": feed["out"], "in": feed["in"],
            "dropped": dict(dropped)}
