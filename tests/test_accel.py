"""The optional C hot path (``shmfeed/_accel.c``), its pure-Python twin, and large values.

The C path must behave exactly like the Python one, so the core tests run a second time
with ``SHMFEED_PURE_PYTHON=1``; the C entry points are also checked directly on the
edges where C could go wrong (released objects, bad arguments, odd sizes).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import shutil
import subprocess
import sys

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import _kill_workers as K
import _workers as W
import shmfeed
from shmfeed import _codec, _native, _ring, _spill

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_the_accelerator_is_built_and_used() -> None:
    if os.environ.get("SHMFEED_PURE_PYTHON"):
        assert _ring._accel is None
        return
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: the pure-Python path is the one in use")
    assert _ring._accel is not None, "shmfeed/_accel.c was not built (see setup.py)"
    channel = shmfeed.Channel[int]()
    assert channel._live_core()._fast is not None
    feed = shmfeed.Feed[int]()
    sub = feed.subscribe(channel)
    assert feed.send(5) == 1 and channel.recv(timeout=5) == 5
    assert feed._open()._fast_plan is not None  # the whole send ran in C
    sub.unsubscribe()
    channel.close()


@pytest.mark.timeout(240)
def test_core_suites_pass_on_the_pure_python_path() -> None:
    environment = {**os.environ, "SHMFEED_PURE_PYTHON": "1"}
    environment.pop("SHMFEED_NAMESPACE", None)  # each test there makes its own
    # The suites of the rings and feeds, where the two paths differ (the codec's one C
    # walk is compared with its Python twin below; async waits use the same takes). The
    # 300 MiB value travels as a spill file on both paths.
    suites = ["test_channel.py", "test_feed.py", "test_overflow.py", "test_bad_input.py", "test_accel.py",
              "test_loan.py"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "-k", "not pure_python_path and not 300_mib", *suites],
        cwd=TESTS, env=environment, capture_output=True, text=True, timeout=220,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


needs_accel = pytest.mark.skipif(_ring._accel is None, reason="the C path is not built")


@needs_accel
def test_a_released_ring_raises_instead_of_touching_unmapped_memory() -> None:
    channel = shmfeed.Channel[int]()
    core = channel._live_core()
    fast = core._fast
    core.release()
    with pytest.raises(ValueError, match="released"):
        fast.offer(b"\x01", os.getpid())
    with pytest.raises(ValueError, match="released"):
        fast.poll(os.getpid())
    with pytest.raises(ValueError, match="released"):
        fast.take_one(os.getpid(), None, None, core)
    fast.release()  # idempotent


@needs_accel
def test_bad_arguments_to_the_c_entry_points_are_clean_errors() -> None:
    accel = _ring._accel
    channel = shmfeed.Channel[int]()
    core = channel._live_core()
    with pytest.raises(TypeError):
        core._fast.offer("text", os.getpid())  # not a buffer
    with pytest.raises(TypeError):
        core._fast.offer(b"x")
    with pytest.raises(OverflowError):
        core._fast.poll(-1)
    with pytest.raises(OverflowError):
        core._fast.take_one(-1, None, None, core)
    with pytest.raises(TypeError):
        core._fast.take_one(1, None, None)
    with pytest.raises(TypeError):
        accel.offer_all([core._fast], b"x", 1, 0)  # a list, not a tuple
    with pytest.raises(TypeError):
        accel.offer_all((object(),), b"x", 1, 0)
    with pytest.raises(ValueError):
        accel.Ring(mmap.mmap(-1, 4096), "/n", "/n", "/n", "/w", 4096, 4096, 64, _ring.ACCEL_WORDS)  # small
    with pytest.raises(ValueError):
        accel.Ring(core.mapping, "/n", "/n", "/n", "/w", 4096, core.ring_bytes, 64, (9999,) * 11)  # outside
    with pytest.raises(ValueError):
        accel.Ring(core.mapping, "/n", "/n", "/n", "/w" * 300, 4096, core.ring_bytes, 64, _ring.ACCEL_WORDS)
    with pytest.raises(OSError):
        accel.Ring(core.mapping, "/sf.no-such-lock", "/sf.no-such-lock", "/sf.no-such-lock", "/w", 4096,
                   core.ring_bytes, 64, _ring.ACCEL_WORDS)
    with pytest.raises(ValueError):
        core._fast.wake(4000, 17, 1)  # a wait list past the header
    with pytest.raises(TypeError):
        core._fast.wake(1, 2)
    with pytest.raises(ValueError):
        accel.copy_into(bytearray(3), b"four")
    channel.send(7)  # the channel is unharmed
    assert channel.recv(timeout=5) == 7
    channel.close()


@needs_accel
@pytest.mark.parametrize("size", [0, 1, 15, 16, 63, 64, 65, 4095, 100_003])
def test_copy_into_copies_exactly(size: int) -> None:
    source = W.large_value(size, size)
    for shift in (0, 1, 8):
        destination = bytearray(size + shift + 5)
        view = memoryview(destination)[shift:]
        _ring._accel.copy_into(view, source)
        view.release()
        assert destination[shift : shift + size] == source
        assert destination[:shift] == bytes(shift) and destination[shift + size :] == bytes(5)


@needs_accel
def test_odd_record_sizes_round_trip_through_the_c_ring() -> None:
    channel = shmfeed.Channel(capacity=64, buffer_size=4096)
    for round_ in range(20):  # many wraps of a small ring
        values = [b"x" * ((round_ * 7 + i) % 200) for i in range(9)]
        for value in values:
            channel.send(value, timeout=5)
        assert [channel.recv(timeout=5) for _ in values] == values
    channel.close()


def _send_and_check_in_processes(mp_context, namespace, channels, check, make, n: int, size: int) -> None:
    """Send ``make(seq, size)`` for seq < n on a feed to ``channels``, each read in its own
    process by ``check`` (a _workers function), which must find every value exact."""
    feed = shmfeed.Feed()
    subs = [feed.subscribe(channel) for channel in channels]
    results = shmfeed.Channel()
    specs = [(check, (namespace, results, channel, n, size)) for channel in channels]
    with K.running(mp_context, *specs) as processes:
        assert [results.recv(timeout=60)[0] for _ in processes] == ["ready"] * len(channels)
        for seq in range(n):
            assert feed.send(make(seq, size)) == len(channels)
        reports = [results.recv(timeout=120) for _ in processes]
        assert [r[0] for r in reports] == ["checked"] * len(channels), reports
        assert [r[2] for r in reports] == [[]] * len(channels)
    assert [p.exitcode for p in processes] == [0] * len(channels)
    for sub in subs:
        sub.unsubscribe()


@pytest.mark.timeout(180)
def test_large_values_survive_pool_reuse_and_in_place_reads(mp_context, namespace) -> None:
    """Enough large values that spill files go round the sender's pool many times while two
    receivers read them in place: any stale, torn or early-reused read shows as a mismatch."""
    channels = [shmfeed.Channel(capacity=3) for _ in range(2)]
    _send_and_check_in_processes(mp_context, namespace, channels, W.check_large_values, W.large_value, 120, 300_000)


@pytest.mark.timeout(180)
def test_large_records_in_parts_reach_inline_and_spilling_channels_alike(mp_context, namespace) -> None:
    """A dict around a large blob is encoded in parts (the blob is not copied until written):
    joined for a channel whose ring takes it inline, written part by part to a spill file for
    one whose ring does not; both receivers get every value exactly."""
    size = 300_000
    channels = [shmfeed.Channel(capacity=3), shmfeed.Channel(capacity=3, buffer_size=4 << 20)]
    assert channels[0]._live_core().inline_limit < size < channels[1]._live_core().inline_limit
    _send_and_check_in_processes(mp_context, namespace, channels, W.check_large_records, W.large_record, 80, size)
    # Channel.send takes the same two roads.
    for channel in channels:
        for seq in range(3):  # the capacity
            channel.send(W.large_record(seq, size), timeout=10)
        assert [channel.recv(timeout=10) for _ in range(3)] == [W.large_record(seq, size) for seq in range(3)]
        channel.close()


def test_a_value_read_in_place_keeps_its_link_until_the_next_large_read(namespace) -> None:
    channel = shmfeed.Channel(capacity=4)
    first, second = W.large_value(1, 200_000), W.large_value(2, 200_000)
    channel.send(first)
    channel.send(second)

    def links() -> list[str]:
        return [name for name in os.listdir("/dev/shm") if ".x" in name and f"c{channel._channel_id:016x}" in name]

    assert len(links()) == 2
    assert channel.recv(timeout=5) == first
    assert len(links()) == 2  # the first is kept while it could still be being decoded
    assert channel.recv(timeout=5) == second
    assert len(links()) == 1  # ... and goes at the next large read
    _spill.unlink_deferred()
    assert links() == []
    channel.close()


@needs_accel
def test_a_c_send_that_stops_at_a_ring_holds_the_feed_lock_for_its_thread_only() -> None:
    import threading

    feed = shmfeed.Feed()
    channel = shmfeed.Channel(capacity=1)
    sub = feed.subscribe(channel)
    assert feed.send(1) == 1  # full now; this also builds the C plan
    core = feed._open()
    plan = core._fast_plan
    assert plan is not None
    answer = core._fast.send(plan.rings, b"\x02", os.getpid(), plan.version)
    assert answer == 0  # ring 0 did not take it: the lock is held, for the Python path
    assert core.send_lock.value == 0
    other = threading.Thread(target=core._fast.unlock_if_held)
    other.start()
    other.join()
    assert core.send_lock.value == 0  # not that thread's to release
    core._fast.unlock_if_held()
    assert core.send_lock.value == 1
    core._fast.unlock_if_held()  # idempotent
    assert core.send_lock.value == 1
    assert channel.recv(timeout=5) == 1
    sub.unsubscribe()
    channel.close()


@needs_accel
def test_a_c_send_drops_at_a_full_drop_newest_ring_and_counts_it_as_the_python_offer_does() -> None:
    from shmfeed import _layout as L

    feed = shmfeed.Feed()
    lossy_a = shmfeed.Channel(capacity=1, overflow="drop_newest")
    blocking = shmfeed.Channel(capacity=1)
    lossy_b = shmfeed.Channel(capacity=1, overflow="drop_newest")
    channels = (lossy_a, blocking, lossy_b)
    subs = [feed.subscribe(channel) for channel in channels]
    assert feed.send(0) == 3  # every ring full now
    core = feed._open()
    plan = core._fast_plan
    assert plan is not None
    # ring 0 drops (counted there) and the C send goes on; ring 1 blocks: it stops there,
    # the feed lock held, saying that one ring before it dropped the value
    answer = core._fast.send(plan.rings, b"\x01", os.getpid(), plan.version)
    try:
        assert answer == 2 * 1 and core._fast.dropped() == 1
    finally:
        core._fast.unlock_if_held()
    assert [channel.statistics().dropped for channel in channels] == [1, 0, 0]
    with pytest.raises(shmfeed.FeedSendTimeout) as timed_out:
        feed.send(2, timeout=0.05)  # dropped at both lossy rings; the blocking one stays full
    assert timed_out.value.delivered == 0  # the ring that dropped it in C is not counted
    assert [channel.statistics().dropped for channel in channels] == [2, 0, 1]
    assert blocking.recv(timeout=5) == 0
    delivered = int(core.words[L.DELIVERED])
    assert feed.send(3) == 1  # all in C: two drops, one delivery
    assert int(core.words[L.DELIVERED]) == delivered + 1
    assert [channel.statistics().dropped for channel in channels] == [3, 0, 2]
    assert [lossy_a.recv(timeout=5), blocking.recv(timeout=5), lossy_b.recv(timeout=5)] == [0, 3, 0]
    for sub in subs:
        sub.unsubscribe()
    for channel in channels:
        channel.close()


@needs_accel
def test_a_c_batch_receive_takes_only_what_decoded_and_nothing_when_interrupted() -> None:
    from shmfeed import _codec

    channel = shmfeed.Channel(16)
    for n in range(5):
        channel.send((n,))  # a tuple (a msgpack ext): decoded by the function given, not in C
    fast = channel._live_core()._fast
    errors = (shmfeed.ChannelCorruptError, shmfeed.UnknownTypeError)
    seen: list[object] = []

    def interrupted(data: bytes) -> object:
        value = _codec.decode(data)
        seen.append(value)
        if value == (2,):
            raise KeyboardInterrupt
        return value

    with pytest.raises(KeyboardInterrupt):
        fast.take_decoded(os.getpid(), 10, interrupted, errors)
    assert seen == [(0,), (1,), (2,)] and len(channel) == 5  # nothing taken: nothing lost

    def refused(data: bytes) -> object:
        value = _codec.decode(data)
        if value == (3,):
            raise shmfeed.UnknownTypeError("a type this side does not know")
        return value

    assert fast.take_decoded(os.getpid(), 10, refused, errors) == [(0,), (1,), (2,)]  # stops before it
    assert len(channel) == 2 and channel.recv_many() == [(3,), (4,)]  # it stays for the next receive
    channel.close()


@needs_accel
def test_the_c_single_receive_takes_an_inline_value_and_leaves_the_rest_to_python() -> None:
    """``Ring.take_one`` (``recv``'s one C call) takes an inline value of modest size,
    decoded in C or else by the function given (after the receive lock is let go), whose
    error is the receive's; anything else, and an empty ring, answer ``nothing`` with the
    ring as it was."""
    nothing = object()
    channel = shmfeed.Channel(16, buffer_size=1 << 20)
    core = channel._live_core()
    fast, pid = core._fast, os.getpid()
    decoded: list[bytes] = []

    def decode(data: bytes) -> object:
        decoded.append(data)
        return _codec.decode_with_msgpack(data)

    assert fast.take_one(pid, nothing, decode, core) is nothing  # empty
    middle = b"m" * (100 << 10)  # inline, but more than one C call copies
    for value in (1, (2,), {"a": [1, "b"]}, middle, b"x" * (2 * core.ring_bytes)):  # a tuple: an ext; the last spills
        channel.send(value)
    assert fast.offer(b"\xc1", pid) == 0  # 0xc1: no msgpack value starts so
    with core.recv_lock:  # another receiver at it: the Python receive waits for the lock
        assert fast.take_one(pid, nothing, decode, core) is nothing and len(channel) == 6
    assert fast.take_one(pid, nothing, decode, core) == 1 and len(channel) == 5 and not decoded
    assert fast.take_one(pid, nothing, decode, core) == (2,) and len(decoded) == 1  # msgpack's, by decode
    assert fast.take_one(pid, nothing, decode, core) == {"a": [1, "b"]}
    assert fast.take_one(pid, nothing, decode, core) is nothing and len(channel) == 3  # too large for one C call
    assert channel.recv() == middle
    assert fast.take_one(pid, nothing, decode, core) is nothing and len(channel) == 2  # a spill record: Python's
    assert channel.recv() == b"x" * (2 * core.ring_bytes)
    with pytest.raises(shmfeed.ChannelCorruptError):
        fast.take_one(pid, nothing, decode, core)  # bad bytes: taken, and decode's error is the receive's
    assert len(channel) == 0 and fast.take_one(pid, nothing, decode, core) is nothing
    channel.close()


@needs_accel
def test_the_c_single_receive_wakes_waiting_senders_whatever_it_answers() -> None:
    """``Ring.take_one`` calls ``core.wake_senders()`` when senders wait for room
    (SEND_WAITING), after taking and before decoding: also when it took nothing or the
    value does not decode; never when none wait."""
    from shmfeed import _layout as L

    class Core:
        woken = 0

        def wake_senders(self) -> None:
            self.woken += 1

    nothing, waiting = object(), Core()
    channel = shmfeed.Channel(16)
    core = channel._live_core()
    fast, pid = core._fast, os.getpid()
    channel.send(1)
    assert fast.offer(b"\xc1", pid) == 0  # bytes no msgpack value starts with
    assert fast.take_one(pid, nothing, _codec.decode_with_msgpack, waiting) == 1 and waiting.woken == 0
    core.words[L.SEND_WAITING] = 1
    try:
        with pytest.raises(shmfeed.ChannelCorruptError):
            fast.take_one(pid, nothing, _codec.decode_with_msgpack, waiting)
        assert waiting.woken == 1
        assert fast.take_one(pid, nothing, _codec.decode_with_msgpack, waiting) is nothing and waiting.woken == 2
    finally:
        core.words[L.SEND_WAITING] = 0
    channel.close()


@needs_accel
def test_a_ring_released_while_its_batch_decode_runs_python_lets_go_only_after_it() -> None:
    """``take_decoded`` calls Python code (msgpack, for an ext value) while it uses the
    mapping; a release from that code (another thread's, at worst) waits for the call to
    end instead of pulling the memory from under it."""
    channel = shmfeed.Channel(16)
    for n in range(3):
        channel.send((n,))  # a tuple: decoded by the function given
    core = channel._live_core()
    fast = core._fast
    errors = (shmfeed.ChannelCorruptError, shmfeed.UnknownTypeError)

    def releasing(data: bytes) -> object:
        core.release()  # the channel let go of in this process: its C ring too
        return _codec.decode(data)

    assert fast.take_decoded(os.getpid(), 10, releasing, errors) == [(0,), (1,), (2,)]
    with pytest.raises(ValueError, match="released"):
        fast.poll(os.getpid())
    channel.close()


@needs_accel
def test_the_c_calls_never_sleep_on_a_taken_lock() -> None:
    """A taken lock is answered "the Python path" at once (which waits with the caller's
    deadline: test_timeouts), with nothing changed; once free, the C calls do the work."""
    from shmfeed import _layout as L

    feed = shmfeed.Feed()
    channel = shmfeed.Channel(capacity=4)
    sub = feed.subscribe(channel)
    assert feed.send(1) == 1  # builds the C plan
    core, feed_core = channel._live_core(), feed._open()
    fast, pid = core._fast, os.getpid()
    wake_args = (L.RECV_WAITLIST_WORD, L.RECV_WAITING, pid)
    for lock in (core.send_lock, core.recv_lock, core.wait_lock, feed_core.send_lock):
        lock.acquire()
        try:
            assert fast.offer(b"\x92\x01", pid) == (2 if lock is core.send_lock else 0)
            assert (fast.poll(pid) is None) == (lock is core.recv_lock)
            assert fast.wake(*wake_args) is (lock is not core.wait_lock)
            plan = feed_core._fast_plan
            answer = feed_core._fast.send(plan.rings, b"\x03", pid, plan.version)
            feed_core._fast.unlock_if_held()
            assert answer == (-1 if lock is feed_core.send_lock else 0 if lock is core.send_lock else -2)
        finally:
            lock.release()
        assert lock.value == 1
    sub.unsubscribe()
    channel.close()


def test_a_lock_wait_lets_a_signal_handler_raise() -> None:
    import signal

    channel = shmfeed.Channel()
    core = channel._live_core()
    core.send_lock.acquire()  # as if another sender held it

    def alarm(*_: object) -> None:
        raise TimeoutError("alarm")

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(TimeoutError, match="alarm"):
            channel.send(1, timeout=5)  # waits for the send lock: the alarm must get out
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        core.send_lock.release()
    channel.send(2, timeout=5)
    assert channel.recv(timeout=5) == 2
    channel.close()


def test_pool_files_only_grow_and_smaller_values_read_right(namespace) -> None:
    channel = shmfeed.Channel(capacity=2)
    sizes = [400_000, 150_000, 300_000, 100_000, 400_000, 90_000]
    for seq, size in enumerate(sizes):  # one at a time: each goes round the same pool file
        channel.send(W.large_value(seq, size), timeout=5)
        assert channel.recv(timeout=5) == W.large_value(seq, size)
    channel.close()


def test_links_kept_by_a_thread_that_ended_go_at_the_next_large_read(namespace) -> None:
    import threading

    channel = shmfeed.Channel(capacity=4)
    for seq in range(2):
        channel.send(W.large_value(seq, 200_000), timeout=5)
    got = []
    reader = threading.Thread(target=lambda: got.append(channel.recv(timeout=5)))
    reader.start()
    reader.join()
    assert got == [W.large_value(0, 200_000)]
    prefix = f"c{channel._channel_id:016x}.x"
    assert len([n for n in os.listdir("/dev/shm") if prefix in n]) == 2  # its link is kept
    assert channel.recv(timeout=5) == W.large_value(1, 200_000)
    assert len([n for n in os.listdir("/dev/shm") if prefix in n]) == 1  # only ours now
    channel.close()


_BIG_LIST = list(range(5000))
_DEEP: list = []
_cursor = _DEEP
for _ in range(400):  # deeper than the C walk's stack
    _cursor.append([])
    _cursor = _cursor[0]


@needs_accel
@pytest.mark.parametrize("value", [
    None, 1, b"x", bytearray(b"x"), memoryview(b"x"), {}, [],
    {"a": 1, "b": b"bytes only"}, {"a": [1, {"b": bytearray(2)}]}, [[[memoryview(b"")]]],
    {memoryview(b"k"): 1}, {"t": (bytearray(1),)},  # a tuple goes through _default
    _BIG_LIST, {"big": _BIG_LIST}, [_BIG_LIST, bytearray(1)], _DEEP,
    [{"k": i} for i in range(600)],
], ids=lambda value: re.sub(r" at 0x[0-9a-f]+", "", repr(value))[:40])  # the same in every process (xdist)
def test_the_c_buffer_walk_agrees_with_the_python_one(value: object) -> None:
    from shmfeed import EncodingError, _codec

    native = _ring._accel.has_buffers(value, _codec._WALK_BUDGET)
    python = _codec._has_buffers(value, _codec._WALK_BUDGET)
    # None means "too big to tell" (the caller then scans the bytes); the C walk may give
    # up sooner (its stack is bounded), but it never says False where Python says True.
    assert native == python or native is None, (native, python)
    if "memory" in repr(value):  # a memoryview is refused (SPEC), bytearray round-trips
        with pytest.raises(EncodingError):
            _codec.encode(value)
    else:
        decoded = _codec.decode(_codec.encode(value))
        assert decoded == value and type(decoded) is type(value)


def _same(left: object, right: object) -> bool:
    """Equal and of the same types all the way down (NaN equal to NaN, -0.0 not to 0.0)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, float):
        assert isinstance(right, float)
        return (math.isnan(left) and math.isnan(right)) or (
            left == right and math.copysign(1, left) == math.copysign(1, right))
    if isinstance(left, list):
        assert isinstance(right, list)
        return len(left) == len(right) and all(map(_same, left, right))
    if isinstance(left, dict):
        assert isinstance(right, dict)
        return list(map(type, left)) == list(map(type, right)) and list(left) == list(right) and all(
            _same(left[key], right[key]) for key in left)
    return left == right


_MSGPACK_ONLY = object()
_keys = st.one_of(st.text(max_size=40), st.integers(min_value=-(2**63), max_value=2**64 - 1))
_plain_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
              st.floats(allow_nan=True), st.text(max_size=300), st.binary(max_size=300)),
    lambda inner: st.one_of(st.lists(inner, max_size=20), st.dictionaries(_keys, inner, max_size=20)),
    max_leaves=40,
)


@needs_accel
@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(value=_plain_values, single_float=st.booleans(), mutation=st.integers(min_value=0, max_value=3),
       where=st.integers(min_value=0), byte=st.integers(min_value=0, max_value=255))
def test_the_c_decoder_answers_as_msgpack_or_leaves_it_to_msgpack(
    value: object, single_float: bool, mutation: int, where: int, byte: int
) -> None:
    """``_accel.decode`` decodes the common values itself (``recv``, ``recv_many``): where it
    answers, the answer is msgpack's, type for type, for valid bytes and for mutated ones
    (a byte changed, cut short, one more at the end), which it otherwise hands to msgpack."""
    try:
        data = bytearray(msgpack.packb(value, use_bin_type=True, use_single_float=single_float))
    except OverflowError:  # a float too large for single precision
        data = bytearray(msgpack.packb(value, use_bin_type=True))
    if mutation == 1:
        data[where % len(data)] = byte
    elif mutation == 2:
        del data[where % len(data):]
    elif mutation == 3:
        data.append(byte)
    got = _native.accel.decode(bytes(data), lambda _: _MSGPACK_ONLY)
    if got is _MSGPACK_ONLY:
        return
    expected = msgpack.unpackb(bytes(data), raw=False, strict_map_key=False, use_list=True)
    assert _same(got, expected)
    if mutation == 0:
        assert _same(got, value if not single_float else expected)


@needs_accel
def test_the_c_decoder_key_cache_never_mixes_keys_up() -> None:
    """More distinct keys than the cache has slots, of every short length, twice over."""
    keys = [f"k{n}" * (1 + n % 7) for n in range(3000)] + ["", "é", "\U0001f600"]
    for _ in range(2):
        for start in range(0, len(keys), 50):
            value = {key: index for index, key in enumerate(keys[start:start + 50])}
            assert _codec.decode(_codec.encode(value)) == value
    assert _native.accel.decode(b"\x81\xa2\xff\xfe\x01", lambda _: "msgpack's") == "msgpack's"  # not UTF-8


@needs_accel
def test_the_c_decoder_str_cache_never_mixes_values_up() -> None:
    """Short str values go through a cache too: strings of every length up to past the
    cache's limit, alike but for one byte anywhere (what its word compare must tell apart),
    more than it has slots, twice over; and a repeated value is the same object."""
    values = [("x" * n)[:where] + chr(65 + letter) + ("x" * n)[where + 1:]
              for n in range(1, 30) for where in range(n) for letter in range(3)]
    values += ["", "é" * 12, "\U0001f600" * 6]
    for _ in range(2):
        for start in range(0, len(values), 40):
            batch = values[start:start + 40]
            assert _codec.decode(_codec.encode(batch)) == batch
    first, second = _codec.decode(_codec.encode(["ABCD", "ABCD"]))
    assert first == "ABCD" and first is second
    assert _native.accel.decode(b"\xa2\xff\xfe", lambda _: "msgpack's") == "msgpack's"  # not UTF-8


_other_values = st.one_of(st.tuples(st.integers()), st.binary().map(bytearray), st.integers(min_value=2**64),
                          st.integers(max_value=-(2**63) - 1), st.just("\ud800"), st.sets(st.integers(), max_size=2))


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(batch=st.lists(st.one_of(_plain_values, _other_values.filter(lambda v: v != "\ud800")), max_size=12),
       bad_at=st.integers(min_value=0, max_value=12))
def test_a_batch_encodes_to_each_values_own_bytes_common_or_not(batch: list, bad_at: int) -> None:
    """``_codec.encode_many`` (the C loop over a batch's common values, msgpack for the
    others in between) gives each value the bytes ``encode`` gives it, in order; a value
    nothing can encode, anywhere, raises what ``encode`` raises for it."""
    assert _codec.encode_many(batch) == [_codec.encode(value) for value in batch]
    bad = batch[:bad_at] + [{"k": object()}] + batch[bad_at:]
    with pytest.raises(shmfeed.EncodingError) as from_batch:
        _codec.encode_many(bad)
    with pytest.raises(shmfeed.EncodingError) as alone:
        _codec.encode(bad[min(bad_at, len(batch))])
    assert str(from_batch.value) == str(alone.value)


@needs_accel
@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(value=_plain_values, other=_other_values, where=st.integers(min_value=0))
def test_the_c_encoder_makes_msgpacks_bytes_or_leaves_the_value_to_msgpack(
    value: object, other: object, where: int
) -> None:
    """``_accel.encode`` encodes the common values itself (every send): its bytes are the
    very bytes of shmfeed's msgpack Packer; a value with anything else in it (a tuple, a
    bytearray, an int past 64 bits, a lone surrogate, a set) it leaves to ``_codec``."""
    assert _native.accel.encode(value) == _codec._new_packer().pack(value)
    assert _codec.encode(value) == _codec._new_packer().pack(value)
    holder = [value, other] if where % 2 else {"k": [1, {"deep": other}], "v": value}
    assert _native.accel.encode(holder) is None
    try:
        encoded = _codec.encode(holder)  # by the Packer, with shmfeed's rules
    except shmfeed.EncodingError:
        assert other == "\ud800"  # msgpack's refusal, worded by _codec
    else:
        assert type(_codec.decode(encoded)) is type(holder)


_EDGE_INTS = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -1, -32, -33,
              -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]
_EDGE_LENGTHS = [0, 15, 16, 31, 32, 255, 256, 65535, 65536]


@needs_accel
def test_the_c_encoder_agrees_with_msgpack_at_every_size_boundary() -> None:
    values: list[object] = [*_EDGE_INTS, 0.0, -0.0, float("inf"), float("nan"), True, False, None]
    for n in _EDGE_LENGTHS:
        values += ["é" * (n // 2) + "a" * (n % 2), "a" * n, b"b" * n, [None] * n, {i: i for i in range(n)}]
    for value in values:
        assert _native.accel.encode(value) == _codec._new_packer().pack(value), repr(value)[:40]
        assert _native.accel.decode(_native.accel.encode(value), None) == value or value != value  # noqa: PLR0124


def test_a_sender_rewrites_the_pool_file_receivers_let_go_of_last(namespace) -> None:
    channel = shmfeed.Channel(capacity=4)
    size = 300_000
    for seq in range(3):  # three in flight at once: three pool files
        channel.send(W.large_value(seq, size), timeout=5)
    files = list(_spill._pools[namespace])
    assert len(files) == 3
    for seq in range(3):
        assert channel.recv(timeout=5) == W.large_value(seq, size)
    # The last value's link is kept until this thread's next large read: that file is not
    # free. Of the two that are, the newer is taken (likelier in the caches), not the oldest.
    assert [file.state() for file in files] == [_spill.FREE, _spill.FREE, _spill.LINKED]
    taken = _spill.lend(namespace, size)
    try:
        assert taken is files[1]
    finally:
        _spill.give_back(namespace, taken)
    channel.send(W.large_value(3, size), timeout=5)
    assert channel.recv(timeout=5) == W.large_value(3, size)
    channel.close()


@pytest.mark.parametrize("link_count", ["accel", "fstat"])
def test_a_pool_file_only_a_view_still_links_is_never_rewritten(namespace, monkeypatch, link_count) -> None:
    """A pool file whose name went (as gc removes a file it takes for a dead process's)
    while a receiver's view pins it has one link left, the pin's: a link count of 1 must
    not pass for free, or the next send would write into the value the view shows."""
    if link_count == "fstat":
        monkeypatch.setattr(_spill, "_link_count", _spill._fstat_link_count)
    elif _native.accel is None:
        pytest.skip("the C accelerator is not built")
    channel = shmfeed.Channel(capacity=4)
    channel.send(W.large_value(0, 300_000), timeout=5)
    view = channel.recv_view(timeout=5)
    first = _spill._pools[namespace][0]
    assert first.state() == _spill.LINKED  # the view's pin
    os.unlink(first.path)
    try:
        assert first.state() == _spill.LOST
        for seq in range(1, 4):
            channel.send(W.large_value(seq, 300_000), timeout=5)
            assert channel.recv(timeout=5) == W.large_value(seq, 300_000)
        assert bytes(view) == W.large_value(0, 300_000)  # untouched by the sends after it
        assert first not in _spill._pools[namespace]
    finally:
        view.release()
    channel.close()


def _two_values_read(channel: shmfeed.Channel, namespace: str) -> tuple[_spill._PoolFile, _spill._PoolFile]:
    """Two large values sent and read: the first's pool file is free, the second's still
    linked (its link goes at this thread's next large read). Returns both files."""
    for seq in range(2):
        channel.send(W.large_value(seq, 300_000), timeout=5)
        assert channel.recv(timeout=5) == W.large_value(seq, 300_000)
    first, second = _spill._pools[namespace][:2]
    return first, second


def test_a_pool_file_whose_descriptor_cannot_tell_is_judged_by_its_name(namespace, monkeypatch) -> None:
    """A descriptor closed under the pool (a daemonising closerange) cannot give the link
    count: the name's lstat decides, and sends go on."""
    channel = shmfeed.Channel(capacity=4)
    first, second = _two_values_read(channel, namespace)

    link_count = _spill._link_count
    pool_descriptors = {first.descriptor, second.descriptor}

    def closed(descriptor: int) -> int:  # the pool's descriptors only: a receiver's are its own
        if descriptor in pool_descriptors:
            raise OSError(9, "Bad file descriptor")
        return link_count(descriptor)

    monkeypatch.setattr(_spill, "_link_count", closed)
    assert (first.state(), second.state()) == (_spill.FREE, _spill.LINKED)
    channel.send(W.large_value(2, 300_000), timeout=5)
    assert channel.recv(timeout=5) == W.large_value(2, 300_000)
    channel.close()


@pytest.mark.parametrize("planted", ["file", "symlink"])
def test_a_pool_file_whose_name_now_holds_something_else_leaves_the_pool(namespace, planted) -> None:
    channel = shmfeed.Channel(capacity=4)
    first, _ = _two_values_read(channel, namespace)
    assert first.state() == _spill.FREE
    os.unlink(first.path)  # as gc would remove it, taking it for a dead process's
    if planted == "file":  # and another user put something at the name
        with open(first.path, "wb") as planted_file:
            planted_file.write(b"x")
    else:
        os.symlink(first.path, first.path)  # a loop: stat() of it fails (ELOOP)
    try:
        assert first.state() == _spill.LOST
        for seq in range(2, 6):  # sends go on, in files of their own
            channel.send(W.large_value(seq, 300_000), timeout=5)
            assert channel.recv(timeout=5) == W.large_value(seq, 300_000)
        assert first not in _spill._pools[namespace] and first.descriptor == -1  # let go of, not removed
        assert os.path.lexists(first.path)
    finally:
        os.unlink(first.path)
    channel.close()
