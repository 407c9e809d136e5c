"""This user's private runtime directory, and the secret in it that keys every shared name.

The directory (mode 0700, owned by the user) holds each namespace's registry socket and
lock files, and ``secret``: 32 random bytes, made once by whichever process of the user
comes first. Object names in the world-writable /dev/shm are derived from that secret
(``_names``), so another user cannot predict them: not to read a feed (the owner check
stops that too), nor to plant a file at a name the victim is about to create.

Where: ``/tmp/shmfeed-<uid>``. /tmp is shared, so another user may have made that
directory first: then ``~/.cache/shmfeed/<host>`` is used instead (a squatted directory is
not a denial of service). Every process of the user picks the same one, because once a
directory is the user's, nobody else can remove it (/tmp is sticky). ``$XDG_RUNTIME_DIR``
is not used: a cron job, ``su`` or a cleaned environment lacks it or has another, and
processes that see different directories would have different secrets, so different
names: they would silently stop sharing feeds.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat

from ._errors import RegistryUnavailableError

SECRET_BYTES = 32

_cache: dict[str, str | bytes] = {}


def runtime_dir() -> str:
    """The user's owner-only (0700) runtime directory (made if missing).

    Raises:
        RegistryUnavailableError: no candidate directory is usable; the message says which
            were tried and why.
    """
    path = _cache.get("dir")
    if isinstance(path, str) and _is_private_dir(path):
        return path
    refused = []
    for candidate in _candidates():
        problem = _make_private_dir(candidate)
        if problem is None:
            _cache["dir"] = candidate
            return candidate
        refused.append(f"{candidate}: {problem}")
    raise RegistryUnavailableError(
        "shmfeed: no private runtime directory is usable (" + "; ".join(refused)
        + "); remove the directory another user made, or give this user a home directory"
    )


def private_subdirectory(name: str) -> str:
    """``<runtime dir>/<name>``, owner-only (0700) like the runtime directory (made if missing).

    Raises:
        RegistryUnavailableError: there is no usable runtime directory, or something else
            than a private directory of ours is at that name.
    """
    path = os.path.join(runtime_dir(), name)
    problem = _make_private_dir(path)
    if problem is not None:
        raise RegistryUnavailableError(f"shmfeed: {path}: {problem}; remove it")
    return path


def user_secret() -> bytes:
    """The user's secret (see the module's docstring), read or made once per process."""
    value = _cache.get("secret")
    if isinstance(value, bytes):
        return value
    directory = runtime_dir()
    path = os.path.join(directory, "secret")
    value = _read_secret(path)
    if value is None:
        temp = os.path.join(directory, f"secret.{os.getpid()}.{secrets.token_hex(8)}")
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                data = secrets.token_bytes(SECRET_BYTES)
                if os.write(descriptor, data) != len(data):
                    raise RegistryUnavailableError(f"shmfeed: cannot write {temp} (disk full?); free some space")
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            try:
                os.link(temp, path)  # whole or not at all; the first of racing processes wins
            except FileExistsError:
                pass
        finally:
            os.unlink(temp)
        value = _read_secret(path)
        if value is None:
            raise RegistryUnavailableError(f"shmfeed: {path} is not a valid secret file; remove it")
    _cache["secret"] = value
    return value


def _candidates() -> list[str]:
    found = [f"/tmp/shmfeed-{os.getuid()}"]
    home = os.path.expanduser("~")
    if home.startswith("/"):
        found.append(os.path.join(home, ".cache", "shmfeed", socket.gethostname() or "host"))
    return found


def _is_private_dir(path: str) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def _make_private_dir(path: str) -> str | None:
    """Make ``path`` (and missing parents, 0700) or check it; None if it is ours and private."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        return error.strerror or str(error)
    if not _is_private_dir(path):
        return "not a directory of yours with mode 0700 (made by someone else?)"
    return None


def _read_secret(path: str) -> bytes | None:
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise RegistryUnavailableError(f"shmfeed: cannot read {path}: {error}; make it readable by you, or remove it") from error
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise RegistryUnavailableError(f"shmfeed: {path} is not a private file of yours; remove it")
        data = os.read(descriptor, SECRET_BYTES + 1)
    finally:
        os.close(descriptor)
    return data if len(data) == SECRET_BYTES else None
