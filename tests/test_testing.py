"""shmfeed.testing: the helpers tests and tools share (wait_until, running, registry pings)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import sys
import time

import psutil
import pytest

import shmfeed
from shmfeed import _registry_client
from shmfeed.testing import EXIT_CODES_ACCEPTED, ping_registry, registry_pid, running, wait_until

pytestmark = pytest.mark.timeout(60)
FORK = multiprocessing.get_context("fork")


# --- wait_until -------------------------------------------------------------------------------


def test_wait_until_returns_the_first_truthy_value():
    counter = itertools.count()
    assert wait_until(lambda: (n := next(counter)) >= 3 and n, 10, "three calls") == 3


def test_wait_until_calls_the_predicate_even_with_no_time_left():
    calls = []
    assert wait_until(lambda: calls.append(1) or "yes", 0) == "yes"
    assert calls == [1]


def test_wait_until_says_what_was_not_reached():
    calls = []
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"^the moon: not reached in 0.05 s$"):
        wait_until(lambda: calls.append(1), 0.05, "the moon")
    assert 0.05 <= time.monotonic() - start < 2.0
    assert len(calls) >= 2  # polled, and asked once more at the deadline


def test_wait_until_lets_the_predicates_error_through():
    with pytest.raises(ZeroDivisionError):
        wait_until(lambda: 1 / 0, 10)


# --- running ------------------------------------------------------------------------------------


def _exit_with(code: int) -> None:
    sys.stdout.flush()
    os._exit(code)


def _raise() -> None:
    raise RuntimeError("a child's failure")


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _terminate() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def test_running_joins_children_that_ended_well():
    with running(FORK, (_exit_with, (0,)), (_kill_self, ())) as (good, killed):
        pass
    assert (good.exitcode, killed.exitcode) == (0, -signal.SIGKILL)
    assert EXIT_CODES_ACCEPTED == (0, -signal.SIGKILL)


@pytest.mark.parametrize("target, args, expected", [
    (_exit_with, (3,), "exit code 3"),
    (_terminate, (), "killed by SIGTERM"),
])
def test_running_fails_a_child_that_ended_otherwise(target, args, expected):
    with pytest.raises(AssertionError, match=f"did not end with 0 or SIGKILL: .*pid \\d+\\): {expected}$"):
        with running(FORK, (target, args)):
            pass


def test_running_fails_a_child_that_raised(capfd):
    with pytest.raises(AssertionError, match="exit code 1"):
        with running(FORK, (_raise, ())):
            pass
    assert "a child's failure" in capfd.readouterr().err


def test_running_fails_and_kills_a_child_still_running():
    with pytest.raises(AssertionError, match="still running"):
        with running(FORK, (_sleep, (60,)), join_timeout=0.2) as (child,):
            pass
    assert child.exitcode == -signal.SIGKILL
    assert not psutil.pid_exists(child.pid) or psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE


def test_running_kills_its_children_when_the_block_fails():
    with pytest.raises(KeyError):
        with running(FORK, (_sleep, (60,)), (_sleep, (60,))) as children:
            raise KeyError("the test failed")
    assert [child.exitcode for child in children] == [-signal.SIGKILL] * 2


# --- the registry --------------------------------------------------------------------------------


def test_no_registry_answers_in_a_namespace_nobody_used(namespace):
    assert ping_registry(namespace, 0.5) is None
    assert _registry_client.ping(namespace, 0.5) is None
    with pytest.raises(AssertionError, match=f"a registry of '{namespace}' answering a ping: not reached"):
        registry_pid(namespace, 0.2)


def test_registry_pid_waits_for_the_registry_a_channel_started(namespace, monkeypatch):
    monkeypatch.delenv("SHMFEED_NO_REGISTRY", raising=False)
    channel = shmfeed.Channel()
    pid = registry_pid(timeout=30)  # this process's namespace
    assert pid == registry_pid(namespace) == ping_registry(namespace)
    assert "registry" in " ".join(psutil.Process(pid).cmdline())
    answer = _registry_client.ping(namespace)
    assert answer is not None and answer["pid"] == pid and answer["namespace"] == namespace
    with pytest.raises(AssertionError, match="not reached"):
        registry_pid(namespace, 0.2, not_pid=pid)  # no other registry takes over a live one
    channel.close()
    del channel
