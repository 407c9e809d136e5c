"""Words and files in /dev/shm are not trusted: a channel header whose ring does not fit, a
spill record that claims more than its file holds, a spill link another user planted, and
attach slots that name no process each get a clear outcome, never a crash, a leak or a
receiver that allocates what a record claims."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Iterator

import pytest

import _attacker as A
import shmfeed
from shmfeed import _gc, _names, _process, _recovery, _release, _ring, _spill
from shmfeed import _layout as L
from test_limits import _attach_from_child, _fill_attach_slots

pytestmark = pytest.mark.timeout(30)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(shmfeed.__file__)))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant another user's file")


@pytest.fixture(autouse=True)
def no_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMFEED_NO_REGISTRY", "1")


def run_python(script: str, *args: str, **environment: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter of this checkout (not of the working directory), in the
    test's namespace."""
    env = {**os.environ, "PYTHONPATH": REPO, **environment}
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=20,
                          cwd="/")


# --- 5. a ring that does not fit its segment -------------------------------------------------

SEND_ON_GEOMETRY_FEED = """
import shmfeed
print(shmfeed.Feed("geometry").send(7))
"""


@pytest.mark.parametrize("data_path", ["c", "python"])
@pytest.mark.parametrize("ring_bytes", [0, 8, 1 << 40])
def test_a_ring_that_does_not_fit_ends_only_its_subscription_as_corrupt(data_path: str, ring_bytes: int) -> None:
    feed = shmfeed.Feed("geometry")
    good, bad = shmfeed.Channel(capacity=4), shmfeed.Channel(capacity=4)
    good_sub, bad_sub = feed.subscribe(good), feed.subscribe(bad)
    words = bad._live_core().words
    kept, words[L.RING_BYTES] = words[L.RING_BYTES], ring_bytes
    try:
        # Another process opens the channels afresh (this one keeps the geometry it read).
        sender = run_python(SEND_ON_GEOMETRY_FEED, SHMFEED_PURE_PYTHON="1" if data_path == "python" else "")
        assert sender.returncode == 0, sender.stderr
        assert sender.stdout.split() == ["1"]
        assert good.recv(timeout=5) == 7
        error = bad_sub.err().recv(timeout=5)
        assert isinstance(error, shmfeed.ChannelCorruptError), error
        assert "damaged" in str(error) and f"a ring of {ring_bytes} bytes" in str(error)
        with pytest.raises(shmfeed.ChannelCorruptError):  # so says every opener (recovery's too)
            _ring.ChannelCore.map_unattached(bad._namespace, bad._channel_id)
    finally:
        words[L.RING_BYTES] = kept
    assert feed.send(8) == 1 and good.recv(timeout=5) == 8
    good_sub.unsubscribe()


# --- 3. a spill record's size --------------------------------------------------------------------

SPARSE_SPILL = r"""
import os, resource
import shmfeed
from shmfeed import _names, _ring

channel = shmfeed.Channel(capacity=4)
spill_id, claimed = _names.new_id(), 512 << 20
path = _names.spill_file(channel._namespace, channel._channel_id, spill_id)
descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
os.ftruncate(descriptor, claimed)  # as long as the record says, but holding nothing
os.close(descriptor)
assert channel._live_core().offer(_ring.KIND_SPILL, _ring.SPILL_REFERENCE.pack(spill_id, claimed)) == _ring.DELIVERED
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    print("received", len(channel.recv(timeout=5)))
except shmfeed.ChannelCorruptError as error:
    print("error:", error)
print("grew KiB:", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak)
print("link left:", os.path.exists(path))
channel.send(b"after", timeout=5)
print("then:", channel.recv(timeout=5))
"""


def test_a_spill_record_claiming_a_sparse_file_is_corrupt_and_allocates_nothing() -> None:
    # A fresh process: its peak RSS shows any allocation of the claimed 512 MiB.
    receiver = run_python(SPARSE_SPILL)
    assert receiver.returncode == 0, receiver.stderr
    lines = receiver.stdout.splitlines()
    assert lines[0].startswith("error: shmfeed: channel") and "(sparse)" in lines[0], lines
    assert int(lines[1].removeprefix("grew KiB: ")) < 64 << 10, lines
    assert lines[2:] == ["link left: False", "then: b'after'"]


def test_a_pool_file_reused_for_a_larger_value_holds_all_of_it(namespace: str) -> None:
    channel = shmfeed.Channel(capacity=4)  # a 64 KiB ring: values over 16 KiB spill
    for size in (100_000, 100_000, 3_000_000):  # the third rewrites the first file, grown
        value = bytes([size % 251]) * size
        channel.send(value, timeout=5)
        assert channel.recv(timeout=5) == value
    pool = _spill._pools[namespace]
    small, grown = sorted(file.size for file in pool)  # encoded sizes: a few bytes more
    assert small < 200_000 and grown > 3_000_000
    for file in pool:
        assert os.fstat(file.descriptor).st_blocks * 512 >= file.size


# --- 4. a spill link planted by another user -------------------------------------------------------


def _plant_link(namespace: str, channel_id: int, owner: int) -> str:
    """A file named like one of the channel's spill links, owned by ``owner``."""
    path = _names.spill_file(namespace, channel_id, _names.new_id())
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    os.chown(path, owner, owner)
    return path


@needs_root
def test_a_spill_link_planted_by_another_user_does_not_keep_the_channel(namespace: str, other_user_turn: None) -> None:
    channel = shmfeed.Channel()
    segment = _names.shm_path(_names.channel_segment(namespace, channel._channel_id))
    planted = _plant_link(namespace, channel._channel_id, A.NOBODY)
    try:
        _release.release_namespace(namespace)
        assert not os.path.exists(segment), "the released channel's segment stayed in /dev/shm"
        assert os.path.exists(planted), "the release removed a file that is not ours"
        assert planted not in _gc.sweep(namespace).all()
    finally:
        os.unlink(planted)


VICTIM = r"""
import os, sys
import shmfeed
from shmfeed import _names, _release

channel = shmfeed.Channel()
print(_names.spill_file(channel._namespace, channel._channel_id, 0)[:-16], flush=True)
sys.stdin.readline()  # a link was planted under that name
segment = _names.shm_path(_names.channel_segment(channel._namespace, channel._channel_id))
_release.release_namespace(channel._namespace)
print("segment left:", os.path.exists(segment), flush=True)
"""


@pytest.fixture
def unprivileged(other_user_turn: None) -> Iterator[A.OtherUser]:
    """Another user (``nobody``) to run a victim as: one who cannot remove what root planted."""
    reason = A.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    library = A.make_library_copy()
    user = A.OtherUser(library)
    try:
        yield user
    finally:
        user.stop()
        A.remove_files_of(A.NOBODY, start="sf.")
        A.remove_files_of(A.NOBODY, start="sem.sf.")
        shutil.rmtree(f"/tmp/shmfeed-{A.NOBODY}", ignore_errors=True)
        shutil.rmtree(library, ignore_errors=True)


def test_an_unprivileged_user_lets_go_of_a_channel_with_a_planted_link(
    namespace: str, unprivileged: A.OtherUser
) -> None:
    # The victim is nobody here and the planted file root's: /dev/shm is sticky, so the
    # victim cannot remove it (root could, which is why the roles are this way round).
    victim = unprivileged.start(VICTIM, namespace=namespace, env={"SHMFEED_NO_REGISTRY": "1"})
    planted = A.hear(victim) + "0123456789abcdef"
    os.close(os.open(planted, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        A.say(victim, "planted")
        assert A.hear(victim) == "segment left: False"
    finally:
        os.unlink(planted)
