"""Namespaces and the names of every shared object (segments, semaphores, spill files).

Every object of a namespace is named ``sf.<token>.<kind><id>`` where ``<token>`` is a short
hash of the namespace, so that names stay short (macOS allows 31 characters) and two
namespaces never collide. On Linux, POSIX shared memory and named semaphores live as files
in ``/dev/shm`` (semaphores as ``sem.<name>``), which lets the cleanup code list them.
"""

from __future__ import annotations

import hashlib
import os
import secrets

SHM_DIR = "/dev/shm"
NAMESPACE_ENV = "SHMFEED_NAMESPACE"
MAX_NAMESPACE_LENGTH = 200
MAX_OBJECT_NAME_LENGTH = 200

_token_cache: dict[str, str] = {}


def current_namespace() -> str:
    """The namespace of this process: ``$SHMFEED_NAMESPACE``, or one per user."""
    namespace = os.environ.get(NAMESPACE_ENV) or f"user-{os.getuid()}"
    return validate_name(namespace, what="namespace", limit=MAX_NAMESPACE_LENGTH)


def validate_name(name: object, *, what: str, limit: int = MAX_OBJECT_NAME_LENGTH) -> str:
    """Check a user-given name; raise TypeError/ValueError that say what is allowed."""
    if not isinstance(name, str):
        raise TypeError(f"shmfeed: {what} must be a str, got {type(name).__name__}")
    if not name or len(name) > limit:
        raise ValueError(f"shmfeed: {what} must have 1 to {limit} characters, got {len(name)}")
    if not name.isprintable():
        raise ValueError(f"shmfeed: {what} {name!r} has unprintable characters")
    return name


def namespace_token(namespace: str) -> str:
    """Eight hex digits standing for the namespace in object names."""
    token = _token_cache.get(namespace)
    if token is None:
        token = hashlib.sha1(namespace.encode()).hexdigest()[:8]
        _token_cache[namespace] = token
    return token


def prefix(namespace: str) -> str:
    """The common start of every object name of the namespace (without the leading '/')."""
    return f"sf.{namespace_token(namespace)}."


def new_id() -> int:
    """A random non-zero 64-bit id for a channel, feed, lock or waker."""
    while True:
        value = secrets.randbits(64)
        if value:
            return value


def channel_segment(namespace: str, channel_id: int) -> str:
    return f"/{prefix(namespace)}c{channel_id:016x}"


def feed_segment(namespace: str, feed_key: str) -> str:
    return f"/{prefix(namespace)}f{feed_key}"


def scope_segment(namespace: str, name: str) -> str:
    return f"/{prefix(namespace)}s{hashlib.sha1(name.encode()).hexdigest()[:20]}"


def named_feed_key(name: str) -> str:
    """The segment key of a named feed: a hash, since names may be long or odd."""
    return "n" + hashlib.sha1(name.encode()).hexdigest()[:20]


def anonymous_feed_key(feed_id: int) -> str:
    return f"a{feed_id:016x}"


def lock_semaphore(namespace: str, lock_id: int) -> str:
    return f"/{prefix(namespace)}l{lock_id:016x}"


def waker_semaphore(namespace: str, waker_id: int) -> str:
    return f"/{prefix(namespace)}w{waker_id:016x}"


def spill_file(namespace: str, channel_id: int, spill_id: int) -> str:
    """Path of one large value's copy linked to one channel (see the ring module)."""
    return f"{SHM_DIR}/{prefix(namespace)}c{channel_id:016x}.x{spill_id:016x}"


def spill_temp_file(namespace: str, spill_id: int) -> str:
    return f"{SHM_DIR}/{prefix(namespace)}t{os.getpid():x}.{spill_id:016x}"


def shm_path(segment_name: str) -> str:
    """The file behind a POSIX shared memory name (Linux)."""
    return SHM_DIR + segment_name


def semaphore_path(semaphore_name: str) -> str:
    """The file behind a POSIX named semaphore (Linux, glibc)."""
    return f"{SHM_DIR}/sem.{semaphore_name.lstrip('/')}"
