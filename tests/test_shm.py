"""The one door to a namespace's objects (``_shm.open_own``, ``_shm.check_semaphore``): what
is planted at one of our names (a FIFO, a symlink, another user's file, a file open to
others) is refused with a clear ``ForeignObjectError`` where the library opens it, skipped
as not ours by gc, recovery and the monitor, and never waited on.

And a full /dev/shm (a small tmpfs in a private mount namespace) is a clear error from the
call that needed the space, never a SIGBUS."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from typing import Iterator

import posix_ipc
import pytest

import shmfeed
from shmfeed import _gc, _inspect, _names, _recovery, _ring, _shm, _spill, _waker

pytestmark = [pytest.mark.timeout(20), pytest.mark.usefixtures("other_user_turn")]  # it plants nobody's files

NOBODY = 65534
KINDS = ["fifo", "symlink", "open to others", "another user's"]


@pytest.fixture(autouse=True)
def no_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMFEED_NO_REGISTRY", "1")


def _skip_unless_possible(kind: str) -> None:
    if kind == "another user's" and os.geteuid() != 0:
        pytest.skip("needs root to make a file another user's")


@contextlib.contextmanager
def planted(path: str, kind: str) -> Iterator[str]:
    """Something at ``path`` that the library did not make, removed afterwards."""
    _skip_unless_possible(kind)
    target = f"{path}.target"
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "symlink":
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.truncate(target, 8192)
        os.symlink(target, path)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.truncate(path, 8192)
        if kind == "open to others":
            os.chmod(path, 0o666)
        else:
            os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        for leftover in (path, target):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_segment_is_refused_where_it_is_opened(namespace: str, kind: str) -> None:
    name = _names.feed_segment(namespace, _names.named_feed_key(namespace, "prices"))
    with planted(_names.shm_path(name), kind):
        with pytest.raises(_shm.ForeignObjectError, match="is not yours") as raised:
            _shm.open_segment(name)
        assert isinstance(raised.value, shmfeed.ShmfeedError) and raised.value.errno == errno.EPERM
        feed, channel = shmfeed.Feed("prices"), shmfeed.Channel()  # takes its next name
        feed.subscribe(channel)
        assert feed.send(1) == 1 and channel.recv(timeout=5) == 1
        assert feed._core is not None and feed._core.segment_name != name and os.path.lexists(_names.shm_path(name))
        feed.close()
        with pytest.raises(OSError):  # read-only too: gc, the monitor and the registry map so
            _gc.map_segment(_names.shm_path(name))


@pytest.mark.parametrize("kind", KINDS)
def test_gc_recovery_and_the_monitor_skip_what_is_planted(namespace: str, kind: str) -> None:
    channel = shmfeed.Channel(capacity=4)
    channel_name = _names.channel_segment(namespace, _names.new_id())
    with planted(_names.shm_path(channel_name), kind) as path:
        assert all(entry.path != path for entry in _gc.own_entries(namespace))
        assert path not in _gc.sweep(namespace).all()
        _recovery.recover_namespace(namespace)
        view = _inspect.snapshot(namespace)
        assert [c["id"] for c in view["channels"]] == [f"{channel._channel_id:016x}"]
        assert os.path.lexists(path), "gc removed what is not ours"
    channel.send("still works", timeout=5)
    assert channel.recv(timeout=5) == "still works"


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_semaphore_is_refused_before_sem_open(namespace: str, kind: str) -> None:
    name = _names.lock_semaphore(namespace, _names.new_id())
    with planted(_names.semaphore_path(name), kind):
        with pytest.raises(_shm.ForeignObjectError, match="is not yours"):
            _shm.open_semaphore(name)
        with pytest.raises(_shm.ForeignObjectError):
            _shm.open_native(name)


def test_a_semaphore_replaced_under_its_name_is_refused_for_waits(namespace: str) -> None:
    name = _names.lock_semaphore(namespace, _names.new_id())
    semaphore = _shm.create_semaphore(name, 1)
    try:
        os.chmod(_names.semaphore_path(name), 0o666)  # as another user's would be
        with pytest.raises(_shm.ForeignObjectError, match="mode 0666"):
            semaphore._native_handle()
    finally:
        semaphore.close()
        _shm.unlink_semaphore(name)


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_waker_is_not_posted(namespace: str, kind: str) -> None:
    waker_id = _names.new_waker_id(os.getpid())
    name = _names.waker_semaphore(namespace, waker_id)
    _skip_unless_possible(kind)
    if kind in ("open to others", "another user's"):  # a real semaphore, but not ours
        planted_semaphore = posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, 0)
        path = _names.semaphore_path(name)
        os.chmod(path, 0o666) if kind == "open to others" else os.chown(path, NOBODY, NOBODY)
        try:
            _waker.post(namespace, waker_id)
            assert planted_semaphore.value == 0, "a semaphore that is not ours was posted"
        finally:
            planted_semaphore.unlink()
            planted_semaphore.close()
        return
    with planted(_names.semaphore_path(name), kind):
        _waker.post(namespace, waker_id)  # neither raises nor waits


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_spill_file_is_a_corrupt_record_not_a_hang(namespace: str, kind: str) -> None:
    channel = shmfeed.Channel(capacity=4)
    core = channel._live_core()
    spill_id = _names.new_id()
    path = _names.spill_file(namespace, channel._channel_id, spill_id)
    with planted(path, kind):
        assert core.offer(_ring.KIND_SPILL, _ring.SPILL_REFERENCE.pack(spill_id, 4096)) == _ring.DELIVERED
        with pytest.raises(shmfeed.ChannelCorruptError, match="not yours"):
            channel.recv(timeout=5)
        assert os.path.lexists(path), "the receiver removed what is not ours"
        channel.send(b"s" * 100_000, timeout=5)  # a real large value still goes through
        assert channel.recv(timeout=5) == b"s" * 100_000
    _spill.unlink_deferred()


# --- a full /dev/shm ---------------------------------------------------------------------------

FULL_DEV_SHM = r"""
import errno, os
import shmfeed
from shmfeed import _shm

def files():
    return sorted(os.listdir("/dev/shm"))

def expect_full(call):
    before = files()
    try:
        call()
    except _shm.SharedObjectError as error:
        assert error.errno == errno.ENOSPC and "/dev/shm is full" in str(error), repr(error)
        assert files() == before, f"left behind: {sorted(set(files()) - set(before))}"
        return True
    return False

print("4 MiB channel:", expect_full(lambda: shmfeed.Channel(buffer_size=4 << 20)))
feed, channel = shmfeed.Feed(), shmfeed.Channel(capacity=4)
sub = feed.subscribe(channel)
print("2 MiB send:", expect_full(lambda: feed.send(b"x" * (2 << 20))))
try:
    channel.recv(timeout=0)
    print("delivered: yes")
except TimeoutError:
    print("delivered: no")
print("subscription intact:", feed.send(b"small") == 1 and channel.recv(timeout=5) == b"small")
channel.send(b"y" * (2 << 20))  # not caught: the traceback, and exit status 1
"""


def test_a_full_dev_shm_is_a_clear_error_never_a_sigbus() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to give a process its own small /dev/shm")
    mount_and_run = 'mount -t tmpfs -o size=1m tmpfs /dev/shm || exit 77; echo mounted; exec "$0" -c "$1"'
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(shmfeed.__file__)))}
    child = subprocess.run(["unshare", "-m", "sh", "-c", mount_and_run, sys.executable, FULL_DEV_SHM],
                           env=env, capture_output=True, text=True, timeout=15, cwd="/")
    if "mounted" not in child.stdout:
        pytest.skip(f"no private mount namespace with a small tmpfs here: {child.stderr.strip()}")
    assert child.returncode == 1, f"status {child.returncode} (negative: a signal)\n{child.stderr}"
    assert child.stdout.splitlines()[1:] == [
        "4 MiB channel: True", "2 MiB send: True", "delivered: no", "subscription intact: True"
    ], child.stdout + child.stderr
    assert "Traceback" in child.stderr and "[Errno 28]" in child.stderr and "/dev/shm is full" in child.stderr
