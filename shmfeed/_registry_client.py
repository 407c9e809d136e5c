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
import importlib.machinery
import os
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

import msgpack

from . import _names, _process, _runtime
from ._errors import RegistryUnavailableError

FRAME = struct.Struct("<I")
MAX_FRAME_BYTES = 16 * 1024 * 1024
DISABLE_ENV = "SHMFEED_NO_REGISTRY"

_lock = threading.Lock()
disabled = False  # set in the registry process itself


def runtime_dir() -> str:
    """The owner-only (0700) directory of the registry's socket and lock files."""
    return _runtime.runtime_dir()


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
                isolated_command("shmfeed._registry", _registry_path(),
                                 ["--namespace", namespace, "--startup-fd", str(startup), "--detach"]),
                cwd="/", pass_fds=(startup,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )
            threading.Thread(target=child.wait, name="shmfeed-registry-reaper", daemon=True).start()
        finally:
            os.close(startup)


_REGISTRY_IMPORTS = ("msgpack", "posix_ipc", "psutil")  # what the registry imports besides us
_BRIDGE_IMPORTS = ("nats", "nkeys")  # and what the bridge it keeps does (nkeys: --creds only)
# The registry runs isolated (-I: no PYTHON* variables, no user site, nothing prepended to
# sys.path) and without site processing (-S: a third of Python's start-up, so the namespace
# is without its watchdog for less time), in "/". Its import path is exactly the one given.
_ISOLATED_BOOT = (
    "import sys; end = sys.argv.index('--'); sys.path.extend(sys.argv[1:end]); del sys.argv[1:end + 1]; "
    "from {module} import main; sys.exit(main(sys.argv[1:]))"
)


def isolated_command(module: str, path: list[str], args: list[str]) -> list[str]:
    """The command that runs ``module.main(args)`` as the registry runs (``-I -S``, its
    import path exactly ``path``, appended after the standard library): the registry
    itself, and the bridge it keeps (``_kept_bridge``)."""
    return [sys.executable, "-I", "-S", "-c", _ISOLATED_BOOT.format(module=module), *path, "--", *args]


def _registry_path() -> list[str]:
    """Where this package and the registry's dependencies were found (appended after the
    standard library, so that a stray ``enum.py`` there cannot shadow it).

    Never this process's working directory or its script's directory unless a module was
    really imported from there: a ``psutil.py`` planted in a shared directory that the
    user runs a program from must not run as the user in the registry.
    """
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    imports: tuple[str, ...] = _REGISTRY_IMPORTS
    if os.environ.get("SHMFEED_BRIDGE_URL", "").strip():  # the registry keeps a bridge (_kept_bridge)
        imports = (*imports, *_BRIDGE_IMPORTS)
    path = [package_parent] + [_import_root(name) for name in imports]
    return list(dict.fromkeys(p for p in path if p))


def _import_root(module_name: str) -> str:
    """The sys.path entry ``module_name`` is (or would be) imported from; "" if unknown.

    The working directory and the script's directory are not searched for a module not yet
    imported: they may be shared with other users.
    """
    module = sys.modules.get(module_name)
    if module is None:
        unsafe = {"", os.getcwd(), os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else ""}
        safe_path = [entry for entry in sys.path if entry not in unsafe and os.path.isdir(entry)]
        spec = importlib.machinery.PathFinder.find_spec(module_name, safe_path)
        origin = spec.origin if spec is not None else None
    else:
        origin = getattr(module, "__file__", None)
    if not origin:
        return ""
    root = os.path.dirname(os.path.abspath(origin))
    return os.path.dirname(root) if os.path.basename(origin).startswith("__init__.") else root


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


def ping(namespace: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The registry's answer to a ping (``pid``, ``started``, ``namespace``); None when no
    registry answers for the namespace within ``timeout`` seconds."""
    try:
        answer = request(namespace, {"op": "ping"}, timeout=timeout)
    except RegistryUnavailableError:
        return None
    return answer if isinstance(answer, dict) and answer.get("ok") else None


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
