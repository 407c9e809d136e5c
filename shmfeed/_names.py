"""Namespaces and the names of every shared object (segments, semaphores, spill files).

Every object of a namespace is named ``sf.<uid>.<token>.<kind><id>``: ``<uid>`` is the user's,
so two users never share a name, and ``<token>`` is a keyed hash of the namespace, so two
namespaces never collide. Hashes are keyed with the user's secret (``_runtime``): a name
seen in ``ls /dev/shm`` tells another user nothing about the names of other feeds, scopes or
namespaces, so nobody can plant a file where the user will create one. On Linux, POSIX shared memory and named semaphores live as files
in ``/dev/shm`` (semaphores as ``sem.<name>``), which lets the cleanup code list them.

Names are built here and parsed here only (``parse_entry``): gc, recovery, the registry and
the monitor classify what they find in ``/dev/shm`` through it, and skip what it does not
recognise.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import re
import struct
from typing import Callable, Iterator, NamedTuple

from . import _process, _runtime

SHM_DIR = "/dev/shm"
NAMESPACE_ENV = "SHMFEED_NAMESPACE"
MAX_NAMESPACE_LENGTH = 200
MAX_OBJECT_NAME_LENGTH = 200

_token_cache: dict[str, str] = {}
# The namespace this process first used (made or opened an object in): set_namespace may
# no longer move the process elsewhere. Inherited by a forked child, as its objects are.
_first_used: str | None = None


def current_namespace() -> str:
    """The namespace of this process: ``$SHMFEED_NAMESPACE``, or one per user.

    Read from the environment at each call (never cached): every object made takes it.
    """
    global _first_used
    namespace = os.environ.get(NAMESPACE_ENV) or default_namespace()
    namespace = validate_name(namespace, what="namespace", limit=MAX_NAMESPACE_LENGTH)
    if _first_used is None:
        _first_used = namespace
    return namespace


def default_namespace() -> str:
    """The namespace of a process that chose none: one per user, shared by all their programs."""
    return f"user-{os.getuid()}"


def set_namespace(name: str) -> None:
    """Choose the namespace of this process and of the processes it starts.

    Unrelated programs of one user share the default namespace (``user-<uid>``): two
    programs that both use ``Feed("events")`` see each other's events. Give each
    application its own, at the start of its main program, before any shmfeed object is
    made (and before a ``forkserver`` is started: it keeps the environment it started
    with). It sets ``SHMFEED_NAMESPACE`` in ``os.environ``, so that children started by
    fork, spawn or forkserver (and ``shmfeed monitor`` run from the program) agree.
    Calling it again with the same name is harmless (a spawn child re-running the main
    module's top does).

    Args:
        name: 1 to 200 printable characters.

    Raises:
        TypeError, ValueError: ``name`` is not a valid namespace.
        RuntimeError: this process already used another namespace (an object was made);
            nothing was changed.
    """
    name = validate_name(name, what="namespace", limit=MAX_NAMESPACE_LENGTH)
    if _first_used is not None and _first_used != name:
        raise RuntimeError(
            f"shmfeed: set_namespace({name!r}) comes after this process already used namespace "
            f"{_first_used!r}; call it at the start of the program, before any shmfeed object is made"
        )
    os.environ[NAMESPACE_ENV] = name


def validate_name(name: object, *, what: str, limit: int = MAX_OBJECT_NAME_LENGTH) -> str:
    """Check a user-given name; raise TypeError/ValueError that say what is allowed."""
    if not isinstance(name, str):
        raise TypeError(f"shmfeed: {what} must be a str, got {type(name).__name__}; pass a str")
    if not name or len(name) > limit:
        raise ValueError(f"shmfeed: {what} must have 1 to {limit} characters, got {len(name)}; pass such a name")
    if not name.isprintable():
        raise ValueError(f"shmfeed: {what} {name!r} has unprintable characters; use printable ones only")
    return name


def _keyed_hash(purpose: str, text: str, digits: int) -> str:
    """``digits`` hex digits of an HMAC of ``text`` under the user's secret."""
    message = f"{purpose}\0{text}".encode()
    return hmac.new(_runtime.user_secret(), message, hashlib.sha256).hexdigest()[:digits]


def namespace_token(namespace: str) -> str:
    """Twelve hex digits standing for the namespace in object and runtime file names."""
    token = _token_cache.get(namespace)
    if token is None:
        token = _keyed_hash("namespace", namespace, 12)
        _token_cache[namespace] = token
    return token


def bridge_home(namespace: str) -> str:
    """Twenty hex digits standing for the namespace on NATS (a durable bridge's consumer
    and the origin of what it publishes): stable while the user's secret is, and another
    for every other namespace, user or host."""
    return _keyed_hash("bridge-home", namespace, 20)


def prefix(namespace: str) -> str:
    """The common start of every object name of the namespace (without the leading '/')."""
    start = _prefix_cache.get(namespace)
    if start is None:  # the uid and the secret behind the token are this process's for good
        start = _prefix_cache[namespace] = f"sf.{os.getuid()}.{namespace_token(namespace)}."
    return start


_prefix_cache: dict[str, str] = {}


def new_id() -> int:
    """A random non-zero 64-bit id for a channel, feed, lock, waker or large value's link.

    Unpredictable (another user sees the names in /dev/shm and could plant a file at a
    name it guesses), from bytes of ``os.urandom`` drawn ``_ID_BATCH`` ids at a time: one
    getrandom call per id cost a large value's send and receive a microsecond each. A
    forked child draws its own (``_forget_ids``), or it would repeat its parent's.
    """
    global _ids
    while True:
        drawn = next(_ids, None)  # one C call: two threads never get the same id
        if drawn is None:
            _ids = struct.iter_unpack("<Q", os.urandom(8 * _ID_BATCH))
        elif drawn[0]:
            return drawn[0]


_ID_BATCH = 512
_ids: Iterator[tuple[int]] = iter(())


def _forget_ids() -> None:
    global _ids
    _ids = iter(())


_process.on_fork_child(_forget_ids)  # after _process renews the pid, before any other hook draws an id


def channel_segment(namespace: str, channel_id: int) -> str:
    return f"/{prefix(namespace)}c{channel_id:016x}"


def feed_segment(namespace: str, feed_key: str) -> str:
    return f"/{prefix(namespace)}f{feed_key}"


ALTERNATIVE_NAMES = 8  # names a named feed or scope may take when another user planted files


def _never(path: str) -> bool:
    return False


def _first_unplanted(candidates: Iterator[str], planted: Callable[[str], bool]) -> str:
    """The first candidate name whose file was not planted by someone else (else the last:
    opening it then says what is wrong).

    Every process of the user walks the same candidates and skips the same planted
    files, so all agree; another user sees a name only once it is in use, so only names
    already used can be planted, never the next one.
    """
    name = ""
    for name in candidates:
        if not planted(shm_path(name)):
            break
    return name


def _alternatives(purpose: str, namespace: str, name: str) -> Iterator[str]:
    for attempt in range(ALTERNATIVE_NAMES):
        yield _keyed_hash(purpose, f"{namespace}\0{name}\0{attempt}", 20)


def scope_segment(namespace: str, name: str, planted: Callable[[str], bool] = _never) -> str:
    """The segment name of a named scope (see ``_first_unplanted``)."""
    start = prefix(namespace)
    return _first_unplanted((f"/{start}s{h}" for h in _alternatives("scope", namespace, name)), planted)


def named_feed_key(namespace: str, name: str, planted: Callable[[str], bool] = _never) -> str:
    """The segment key of a named feed: a keyed hash, since names may be long or odd (see
    ``_first_unplanted`` for ``planted``)."""
    segment = _first_unplanted((feed_segment(namespace, "n" + h) for h in _alternatives("feed", namespace, name)), planted)
    return segment[len(prefix(namespace)) + 2:]


def anonymous_feed_key(feed_id: int) -> str:
    return f"a{feed_id:016x}"


def lock_semaphore(namespace: str, lock_id: int) -> str:
    return f"/{prefix(namespace)}l{lock_id:016x}"


def waker_semaphore(namespace: str, waker_id: int) -> str:
    return f"/{prefix(namespace)}w{waker_id:016x}"


def spill_file(namespace: str, channel_id: int, spill_id: int) -> str:
    """Path of one large value's copy linked to one channel (see the ring module)."""
    return "%s/%sc%016x.x%016x" % (SHM_DIR, prefix(namespace), channel_id, spill_id)  # twice an f-string's speed


def spill_temp_file(namespace: str, spill_id: int) -> str:
    return f"{SHM_DIR}/{prefix(namespace)}t{_process.pid():x}.{spill_id:016x}"


def spill_pin_file(namespace: str, pin_id: int) -> str:
    """Where a receiver moves its link to a large value it hands out as a view (see
    ``_spill.read_pinned``): its own name, with its pid, so that neither the channel's end
    nor a release of the namespace removes it while the view lives (gc does once the
    process is dead)."""
    return "%s/%sp%x.%016x" % (SHM_DIR, prefix(namespace), _process.pid(), pin_id)


def shm_path(segment_name: str) -> str:
    """The file behind a POSIX shared memory name (Linux)."""
    return SHM_DIR + segment_name


def semaphore_path(semaphore_name: str) -> str:
    """The file behind a POSIX named semaphore (Linux, glibc)."""
    return f"{SHM_DIR}/sem.{semaphore_name.lstrip('/')}"


def new_waker_id(pid: int) -> int:
    """A waker's id: its process's pid in the high 32 bits (so that a dead process's waker
    can be told by its name alone), random non-zero low bits."""
    return (pid << 32) | (new_id() & 0xFFFF_FFFF or 1)


def waker_pid(waker_id: int) -> int:
    """The process a waker belongs to (see ``new_waker_id``)."""
    return waker_id >> 32


class EntryKind(enum.Enum):
    """What a name of a namespace in /dev/shm is."""

    CHANNEL = "channel"  # segment c<id>
    FEED = "feed"  # segment f<key>
    SCOPE = "scope"  # segment s<hash>
    CREATING = "creating"  # a segment's temporary name before it is published (see _shm)
    LOCK = "lock"  # semaphore l<id>
    WAKER = "waker"  # semaphore w<id>, its process's pid in the id
    SPILL_LINK = "spill link"  # c<channel id>.x<spill id>: a large value linked to a channel
    SPILL_TEMP = "spill temp"  # t<pid>.<spill id>: a sender's pool file
    SPILL_PIN = "spill pin"  # p<pid>.<pin id>: a receiver's link to a value it holds as a view


SEGMENT_ENTRY_KINDS = (EntryKind.CHANNEL, EntryKind.FEED, EntryKind.SCOPE)


class Entry(NamedTuple):
    """One recognised name in /dev/shm (``parse_entry``)."""

    kind: EntryKind
    file: str  # the name in /dev/shm
    key: str  # what follows the kind letter: a hex id, a feed key, a scope hash
    segment: str  # a segment's POSIX name: its own, or its channel's for a spill link; else ""
    pid: int  # a waker's or spill temp file's process; else 0

    @property
    def path(self) -> str:
        return f"{SHM_DIR}/{self.file}"

    @property
    def number(self) -> int:
        """The id of a channel, lock or waker."""
        return int(self.key, 16)


_HEX16 = "[0-9a-f]{16}"
_SEGMENT_KEYS = {
    "c": (EntryKind.CHANNEL, _HEX16),
    "f": (EntryKind.FEED, f"n[0-9a-f]{{20}}|a{_HEX16}"),  # named_feed_key, anonymous_feed_key
    "s": (EntryKind.SCOPE, "[0-9a-f]{20}"),
}
_SEGMENT = re.compile(r"(?P<letter>[cfs])(?P<key>[0-9a-z]+)(?P<creating>\.t[0-9a-f]+)?")
_SEMAPHORE = re.compile(f"(?P<letter>[lw])(?P<key>{_HEX16})")
_SPILL_LINK = re.compile(f"c(?P<key>{_HEX16})\\.x{_HEX16}")
_SPILL_TEMP = re.compile(f"t(?P<pid>[0-9a-f]{{1,8}})\\.{_HEX16}")
_SPILL_PIN = re.compile(f"p(?P<pid>[0-9a-f]{{1,8}})\\.{_HEX16}")


_SEMAPHORE_TEMP = re.compile(r"sem\.[A-Za-z0-9]{6}")  # glibc sem_open's mkstemp pattern


def is_semaphore_temp(file: str) -> bool:
    """Whether a name in /dev/shm is one of glibc's temporary files of ``sem_open``."""
    return _SEMAPHORE_TEMP.fullmatch(file) is not None


def parse_entry(namespace: str, file: str) -> Entry | None:
    """Classify a name in /dev/shm; None if it is not one this module builds for ``namespace``.

    Shared names are never trusted: anything else (planted, damaged, of another format) is
    None, never an exception.
    """
    start = prefix(namespace)
    if file.startswith("sem." + start):
        match = _SEMAPHORE.fullmatch(file, len("sem." + start))
        if match is None:
            return None
        key = match["key"]
        if match["letter"] == "l":
            return Entry(EntryKind.LOCK, file, key, "", 0)
        return Entry(EntryKind.WAKER, file, key, "", waker_pid(int(key, 16)))
    if not file.startswith(start):
        return None
    position = len(start)
    if match := _SPILL_LINK.fullmatch(file, position):
        return Entry(EntryKind.SPILL_LINK, file, match["key"], f"/{start}c{match['key']}", 0)
    if match := _SPILL_TEMP.fullmatch(file, position):
        return Entry(EntryKind.SPILL_TEMP, file, "", "", int(match["pid"], 16))
    if match := _SPILL_PIN.fullmatch(file, position):
        return Entry(EntryKind.SPILL_PIN, file, "", "", int(match["pid"], 16))
    match = _SEGMENT.fullmatch(file, position)
    if match is None:
        return None
    kind, key_pattern = _SEGMENT_KEYS[match["letter"]]
    if not re.fullmatch(key_pattern, match["key"]):
        return None
    segment = f"/{start}{match['letter']}{match['key']}"
    return Entry(EntryKind.CREATING if match["creating"] else kind, file, match["key"], segment, 0)
