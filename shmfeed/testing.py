"""Helpers for the tests and tools of programs that use shmfeed (as ``trio.testing`` is
for trio): shmfeed's own tests and tools use them too.

- ``wait_until(predicate, timeout, what)``: poll for a condition nobody can announce (a
  send blocked on a full channel, a registry that noticed a death, /dev/shm emptied).
  Where a process can say "ready", wait for its message instead: a handshake is exact, a
  poll only bounded.
- ``running(ctx, (target, args), ...)``: child processes for the length of a ``with``
  block, joined at its end and held to one exit-code policy.
- ``registry_pid(namespace, timeout)``: the pid of the namespace's registry once it
  answers; ``ping_registry`` asks once.

Failures are ``AssertionError``s, so that pytest reports them as a test's failure.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any, Callable, Iterator, Sequence, TypeVar

from . import _names, _registry_client

__all__ = ["wait_until", "running", "registry_pid", "ping_registry", "EXIT_CODES_ACCEPTED"]

T = TypeVar("T")

POLL_SECONDS = 0.002  # a poll costs a predicate call; conditions here come within milliseconds
JOIN_SECONDS = 30.0
# What a child of ``running`` may end with: success, or the SIGKILL a test or tool sent it.
EXIT_CODES_ACCEPTED = (0, -signal.SIGKILL)


def wait_until(predicate: Callable[[], T], timeout: float = 60.0, what: str = "condition") -> T:
    """Call ``predicate()`` every couple of milliseconds until it returns something truthy,
    and return that value.

    Use it only for what no process can announce; it does not sleep between processes'
    steps, it observes them. The predicate is always called at least once, and once more
    at the deadline.

    Args:
        predicate: a call without arguments; its first truthy result is returned.
        timeout: seconds before giving up.
        what: the condition in words, for the failure message ("the child's send waiting").

    Returns:
        The predicate's first truthy result.

    Raises:
        AssertionError: ``what: not reached in <timeout> s``.
        Anything ``predicate`` raises.
    """
    deadline = time.monotonic() + timeout
    while True:
        last_call = time.monotonic() >= deadline
        value = predicate()
        if value:
            return value
        if last_call:
            raise AssertionError(f"{what}: not reached in {timeout} s")
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


@contextlib.contextmanager
def running(ctx: Any, *specs: tuple[Callable[..., Any], Sequence[Any]],
            join_timeout: float = JOIN_SECONDS) -> Iterator[list[Any]]:
    """Start one process per ``(target, args)`` with the multiprocessing context ``ctx``,
    and yield them (in order).

    When the block ends normally, every child is joined (``join_timeout`` seconds each) and
    must have ended with an exit code in ``EXIT_CODES_ACCEPTED``: 0, or killed by SIGKILL
    (the only signal tests and tools send a child on purpose). A child that raised (exit
    code 1), crashed (another signal) or still runs fails the block. A test that kills a
    child asserts its exit code itself, to say that this child was the one killed.
    Whatever is still alive when the block ends (normally or not) is killed and joined,
    so a failing test leaves no process behind.

    Args:
        ctx: a multiprocessing context (``multiprocessing.get_context("spawn")``) or the
            ``multiprocessing`` module.
        specs: ``(target, args)`` pairs; targets must be importable under spawn and
            forkserver (module-level functions).
        join_timeout: seconds to wait for each child at the end of the block.

    Raises:
        AssertionError: at the end of the block, a child ended otherwise (its name, pid
            and exit code are in the message).
    """
    processes = [ctx.Process(target=target, args=tuple(args)) for target, args in specs]
    try:
        for process in processes:
            process.start()
        yield processes
        for process in processes:
            process.join(join_timeout)
        wrong = [f"{process.name} (pid {process.pid}): {_exit_text(process.exitcode)}"
                 for process in processes if process.exitcode not in EXIT_CODES_ACCEPTED]
        if wrong:
            raise AssertionError("child process(es) did not end with 0 or SIGKILL: " + "; ".join(wrong))
    finally:
        for process in processes:
            if process.pid is not None and process.is_alive():
                process.kill()
            if process.pid is not None:
                process.join(join_timeout)


def _exit_text(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def ping_registry(namespace: str | None = None, timeout: float = 2.0) -> int | None:
    """Ask the namespace's registry once: its pid, or None when none answers in time.

    Args:
        namespace: the namespace (default: this process's, ``SHMFEED_NAMESPACE``).
        timeout: seconds for the whole exchange.
    """
    answer = _registry_client.ping(namespace or _names.current_namespace(), timeout)
    return None if answer is None else int(answer["pid"])


def registry_pid(namespace: str | None = None, timeout: float = 30.0, *, not_pid: int | None = None) -> int:
    """The pid of the namespace's registry, once one answers a ping.

    A registry starts in the background at a namespace's first use, so right after a
    ``Channel()`` none may answer yet; after a registry was killed, pass its pid as
    ``not_pid`` to wait for the one that replaces it. It does not start a registry
    (``Channel()``, ``Feed(...)`` and waits on a dead holder's lock do).

    Args:
        namespace: the namespace (default: this process's, ``SHMFEED_NAMESPACE``).
        timeout: seconds to wait for an answer.
        not_pid: a registry pid that does not count (a killed one).

    Raises:
        AssertionError: no registry (other than ``not_pid``) answered within ``timeout``.
    """
    name = namespace or _names.current_namespace()

    def answered() -> int | None:
        pid = ping_registry(name, timeout=min(2.0, timeout) if timeout > 0 else 0.5)
        return pid if pid is not None and pid != not_pid else None

    pid = wait_until(answered, timeout, f"a registry of {name!r} answering a ping")
    assert pid is not None
    return pid
