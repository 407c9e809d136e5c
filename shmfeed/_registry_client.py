"""The one door to the registry: make sure it runs, and ask it things.

The registry of a namespace holds an exclusive ``flock`` on ``<runtime dir>/<ns>.lock`` for
its whole life, so "is it running?" is one non-blocking shared-lock attempt, and two
registries can never run at once. A process that finds none starts one in the background
(under a second lock so that processes starting together spawn one, not fifty) and goes
on at once: the registry is the control plane's watchdog, never on the data path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
from typing import Any

import msgpack

from . import _names, _process
from ._errors import RegistryUnavailableError

FRAME = struct.Struct("<I")
MAX_FRAME_BYTES = 16 * 1024 * 1024
DISABLE_ENV = "SHMFEED_NO_REGISTRY"

_lock = threading.Lock()
disabled = False  # set in the registry process itself


def runtime_dir() -> str:
    """The owner-only (0700) directory of the registry's socket and lock files."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "shmfeed") if base else f"/tmp/shmfeed-{os.getuid()}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RegistryUnavailableError(
            f"shmfeed: {path} must be a directory owned by you with mode 0700; remove or fix it"
        )
    return path


def lock_path(namespace: str) -> str:
    return os.path.join(runtime_dir(), f"{_names.namespace_token(namespace)}.lock")


def startup_lock_path(namespace: str) -> str:
    return os.path.join(runtime_dir(), f"{_names.namespace_token(namespace)}.start")


def socket_path(namespace: str) -> str:
    return os.path.join(runtime_dir(), f"{_names.namespace_token(namespace)}.sock")


def _open_lock_file(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def is_running(namespace: str) -> bool:
    """True if a registry holds the namespace's lock."""
    try:
        # Not created here: a registry makes it and removes it when it leaves.
        descriptor = os.open(lock_path(namespace), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(descriptor)
    return False


def forget_dead_registry(namespace: str) -> None:
    """Remove the runtime files (lock, startup lock, socket) a killed registry left; nothing
    if a registry runs."""
    if is_running(namespace):
        return
    for path in (socket_path(namespace), lock_path(namespace), startup_lock_path(namespace)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def ensure_running(namespace: str) -> None:
    """Start the namespace's registry in the background if none runs (cheap when one does)."""
    if disabled or os.environ.get(DISABLE_ENV) or _process.exiting():
        return  # at exit a daemon thread's watchdog must not start one
    try:
        if is_running(namespace):
            return
        _spawn(namespace)
    except OSError:
        pass  # no registry: the data path works without one; cleanup waits for the next try


def _spawn(namespace: str) -> None:
    with _lock:
        startup = _open_lock_file(startup_lock_path(namespace))
        try:
            try:
                fcntl.flock(startup, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # another process is starting it right now
            if is_running(namespace):
                return
            # The child inherits the startup lock and drops it once it holds the registry
            # lock, so nobody else spawns a duplicate in between. It forks the registry
            # proper and exits at once; a thread reaps it, so no zombie or child is left.
            child = subprocess.Popen(
                [sys.executable, "-S", "-m", f"{__package__}._registry", "--namespace", namespace,
                 "--startup-fd", str(startup), "--detach"],
                pass_fds=(startup,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, env=_registry_environment(),
            )
            threading.Thread(target=child.wait, name="shmfeed-registry-reaper", daemon=True).start()
        finally:
            os.close(startup)


def _registry_environment() -> dict[str, str]:
    """Our environment, with this process's import path spelled out.

    The registry starts with ``-S`` (no site processing: a third of Python's start-up), so
    it must be told where this package and its dependencies are; a registry that starts
    faster is a namespace that is without its watchdog for less time.
    """
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [package_parent] + [entry for entry in sys.path if entry and os.path.isdir(entry)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}


def request(namespace: str, message: dict[str, Any], timeout: float = 5.0) -> Any:
    """Send one request to the registry and return its answer.

    Raises:
        RegistryUnavailableError: no registry answers for the namespace.
    """
    path = socket_path(namespace)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(path)
            write_frame(connection, message)
            return read_frame(connection)
    except (OSError, ValueError) as error:
        raise RegistryUnavailableError(
            f"shmfeed: no registry answers for namespace {namespace!r} ({error}); "
            f"start one with `shmfeed registry` or use the namespace"
        ) from error


def write_frame(connection: socket.socket, message: Any) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    connection.sendall(FRAME.pack(len(data)) + data)


def read_frame(connection: socket.socket) -> Any:
    """One length-prefixed msgpack frame; ValueError for anything malformed."""
    header = _read_exactly(connection, FRAME.size)
    (length,) = FRAME.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes is too large")
    try:
        return msgpack.unpackb(_read_exactly(connection, length), raw=False, strict_map_key=False)
    except Exception as error:  # noqa: BLE001 - any decoding failure is a bad frame
        raise ValueError(f"undecodable frame: {error}") from error


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = connection.recv(remaining)
        if not chunk:
            raise ValueError("connection closed mid-frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _forget_after_fork() -> None:
    global _lock
    _lock = threading.Lock()


_process.on_fork_child(_forget_after_fork)
