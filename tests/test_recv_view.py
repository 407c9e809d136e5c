"""``Channel.recv_view``: a large value without a copy, as a read-only view of the spill
file it travelled in, pinned for exactly as long as anything made from it lives."""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path
from typing import Any

import pytest

import shmfeed
from shmfeed import _gc, _names, _native
from shmfeed.testing import wait_until

pytestmark = pytest.mark.timeout(60)
needs_accel = pytest.mark.skipif(_native.accel is None, reason="views need the C accelerator")
REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _pins(namespace: str) -> list[str]:
    return [entry.file for entry in _gc.own_entries(namespace) if entry.kind is _names.EntryKind.SPILL_PIN]


def _spilling_channel() -> shmfeed.Channel[bytes]:
    return shmfeed.Channel(16, buffer_size=MIB)  # values over 256 KiB travel as spill files


@needs_accel
def test_a_large_value_comes_as_a_read_only_view_pinned_while_any_part_of_it_lives(namespace: str) -> None:
    channel = _spilling_channel()
    try:
        value = os.urandom(MIB)
        channel.send(value)
        view = channel.recv_view()
        assert isinstance(view, memoryview) and view.readonly and view == value
        with pytest.raises(TypeError):
            view[0] = 1  # read-only
        assert len(_pins(namespace)) == 1
        middle = view[1000:2000]
        view.release()
        assert len(_pins(namespace)) == 1 and bytes(middle) == value[1000:2000]  # the slice holds it
        del middle
        gc.collect()
        assert _pins(namespace) == []
        with channel.send(value) or channel.recv_view() as block:
            assert block == value and len(_pins(namespace)) == 1
        assert _pins(namespace) == []
    finally:
        channel.close()


@needs_accel
def test_a_held_view_never_changes_while_the_sender_reuses_its_files(namespace: str) -> None:
    """The sender rewrites a spill file in place once every receiver let go of it: a view
    held is a receiver that did not."""
    channel = _spilling_channel()
    try:
        held = []
        for n in range(40):
            channel.send(bytes([n]) * MIB)
            view = channel.recv_view()
            if n % 4 == 0:
                held.append((n, view))
            else:
                view.release()
        for n, view in held:
            assert view[0] == n and view[-1] == n and view.tobytes().count(n) == MIB
        del held, view
        gc.collect()
        assert _pins(namespace) == []
    finally:
        channel.close()


@needs_accel
def test_a_numpy_array_comes_as_a_read_only_array_over_the_file(namespace: str) -> None:
    np = pytest.importorskip("numpy")
    channel: shmfeed.Channel[object] = shmfeed.Channel(16, buffer_size=MIB)
    try:
        array = np.arange(MIB // 8 * 3, dtype=np.float64).reshape(3, -1)
        channel.send(array)
        got = channel.recv_view()
        assert type(got) is np.ndarray and got.dtype == array.dtype and got.shape == array.shape
        assert not got.flags.writeable and not got.flags.owndata and (got == array).all()
        assert len(_pins(namespace)) == 1
        column = got[:, 5]
        del got
        assert len(_pins(namespace)) == 1 and column[1] == array[1, 5]
        del column
        gc.collect()
        assert _pins(namespace) == []
    finally:
        channel.close()


def test_small_values_and_other_types_decode_as_recv_does(namespace: str) -> None:
    channel: shmfeed.Channel[object] = shmfeed.Channel(16, buffer_size=MIB)
    try:
        for value in (b"small", {"a": (1, 2)}, [1, "x"], bytearray(b"ba")):
            channel.send(value)
            got = channel.recv_view()
            if isinstance(value, (bytes, bytearray)):
                assert isinstance(got, memoryview) and got.readonly and got == value
            else:
                assert got == value and type(got) is type(value)
        assert _pins(namespace) == []
    finally:
        channel.close()


@needs_accel
def test_a_view_held_by_a_killed_process_is_cleaned_up(namespace: str, mp_context: Any) -> None:
    import _workers as W

    channel = _spilling_channel()
    report: shmfeed.Channel[int] = shmfeed.Channel(4)
    child = mp_context.Process(target=W.hold_view, args=(namespace, channel, report))
    child.start()
    try:
        channel.send(os.urandom(MIB))
        assert report.recv(30) == MIB
        assert len(_pins(namespace)) == 1
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        wait_until(lambda: _pins(namespace) == [], 10, "the dead process's pin removed (registry)")
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)
        channel.close()
        report.close()


@needs_accel
def test_a_large_array_view_is_aligned_for_numpy(namespace: str) -> None:
    np = pytest.importorskip("numpy")
    from shmfeed import _codec

    channel: shmfeed.Channel[object] = shmfeed.Channel(16, buffer_size=MIB)
    try:
        for dtype in ("f8", "f4", "i2", "u1", "c16"):
            array = np.arange(MIB // 2, dtype=dtype)
            channel.send(array)
            got = channel.recv_view()
            assert got.flags.aligned and got.ctypes.data % _codec.ARRAY_ALIGNMENT == 0, dtype
            assert (got == array).all()
            del got
    finally:
        channel.close()
