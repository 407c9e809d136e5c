import pytest

import shmfeed

pytestmark = pytest.mark.timeout(30)


def _child(channel: shmfeed.Channel, results: shmfeed.Channel) -> None:
    results.send(channel.recv(timeout=10) * 2)


def test_channel_round_trip_across_processes(mp_context):
    channel, results = shmfeed.Channel(), shmfeed.Channel()
    process = mp_context.Process(target=_child, args=(channel, results))
    process.start()
    channel.send(21)
    assert results.recv(timeout=20) == 42
    process.join(10)
    assert process.exitcode == 0


def _report_identity(results: shmfeed.Channel) -> None:
    import os

    from shmfeed import _process, _ring

    results.send([os.getpid(), _ring._pid, _process.identity()[0]])


def test_per_process_state_is_rebuilt_in_children(mp_context):
    results = shmfeed.Channel()
    process = mp_context.Process(target=_report_identity, args=(results,))
    process.start()
    pid, ring_pid, identity_pid = results.recv(timeout=20)
    process.join(10)
    assert pid == ring_pid == identity_pid == process.pid
