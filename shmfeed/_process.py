"""Process identity (pid plus start time) and per-process lifecycle hooks (fork, exit).

PIDs are reused, so a process is named by ``(pid, start_ticks)``: the start time in clock
ticks since boot from ``/proc/<pid>/stat``. A zombie counts as dead.

Per-process state (wakers, attachments, caches) must be rebuilt in a forked child and
released at exit. ``multiprocessing`` children leave through ``os._exit`` after running
``multiprocessing.util`` finalizers, not ``atexit``, so exit hooks are registered with both.

At exit, daemon threads may still sleep inside the library (on a semaphore, or reading a
mapping). So exit hooks let go of shared names and attach slots but close and unmap
nothing: ``exiting()`` tells them, and the operating system reclaims the rest.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Callable

import psutil

_fork_hooks: list[Callable[[], None]] = []
_before_fork_hooks: list[Callable[[], None]] = []
_after_fork_parent_hooks: list[Callable[[], None]] = []
_exit_hooks: list[Callable[[], None]] = []
_identity: tuple[int, int] | None = None
_exit_ran_in: int | None = None
_exit_done_in: int | None = None
_pid = os.getpid()  # os.getpid() is a system call each time: kept here, renewed in a forked child


def start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return _start_ticks_psutil(pid)
    # The command name may hold spaces and parentheses: fields follow the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _start_ticks_psutil(pid: int) -> int | None:
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return int(process.create_time() * 100)
    except psutil.Error:
        return None


# A slot a parent holds for a child it is forking (see _layout.reserve_for_child) records,
# instead of a start time, this tag and the time of the fork in clock ticks since boot (the
# unit and clock of a process's start time in /proc). The child claims it in its first
# instructions; one unclaimed for FORK_CLAIM_SECONDS is a child that died first, and stops
# counting as alive.
FORK_RESERVED = 0xFFFF << 48
FORK_CLAIM_SECONDS = 5
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def ticks_since_boot() -> int:
    """Now, in the unit and clock of a process's start time."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLOCK_TICKS)


def fork_reservation() -> int:
    """The start-time word of a slot reserved now for a child."""
    return FORK_RESERVED | ticks_since_boot()


def is_fork_reservation(ticks: int) -> bool:
    return int(ticks) >> 48 == 0xFFFF


def reserved_at(ticks: int) -> int:
    return int(ticks) & 0xFFFF_FFFF_FFFF


def matches(now_ticks: int | None, ticks: int) -> bool:
    """Whether a live process that started at ``now_ticks`` is the one recorded as
    ``ticks`` (0: unknown, any; a fork reservation: the parent, for a while)."""
    if now_ticks is None:
        return False
    if ticks == 0:
        return True
    if is_fork_reservation(ticks):
        return ticks_since_boot() - reserved_at(ticks) < FORK_CLAIM_SECONDS * _CLOCK_TICKS
    return now_ticks == ticks


def is_alive(pid: int, ticks: int) -> bool:
    """True if the process ``pid`` that started at ``ticks`` still runs (see ``matches``)."""
    if pid <= 0:
        return False
    return matches(start_ticks(pid), ticks)


def has_unknown_child(known: set[int], since: int) -> bool:
    """Whether this process has a live child, started at ``since`` (clock ticks since boot)
    or later, whose pid is not in ``known``: one that may not have claimed the slot
    reserved for it yet."""
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return True
    for child in children:
        started = start_ticks(child.pid)
        if child.pid not in known and started is not None and started >= since - 1:
            return True
    return False


def pid() -> int:
    """This process's pid, without a system call (renewed first thing in a forked child)."""
    return _pid


def identity() -> tuple[int, int]:
    """``(pid, start_ticks)`` of this process."""
    global _identity
    pid = _pid
    if _identity is None or _identity[0] != pid:
        _identity = (pid, start_ticks(pid) or 0)
    return _identity


def on_fork_child(hook: Callable[[], None]) -> None:
    """Call ``hook`` in every forked child, before anything else runs there."""
    _fork_hooks.append(hook)


def before_fork(hook: Callable[[], None]) -> None:
    """Call ``hook`` in the parent just before every fork."""
    _before_fork_hooks.append(hook)


def after_fork_in_parent(hook: Callable[[], None]) -> None:
    """Call ``hook`` in the parent just after every fork."""
    _after_fork_parent_hooks.append(hook)


def _run_hooks(hooks: list[Callable[[], None]]) -> None:
    for hook in hooks:
        try:
            hook()
        except Exception:  # noqa: BLE001 - a failing hook must not break fork
            pass


def _before_fork() -> None:
    _run_hooks(_before_fork_hooks)


def _after_fork_in_parent() -> None:
    _run_hooks(_after_fork_parent_hooks)


def on_exit(hook: Callable[[], None]) -> None:
    """Call ``hook`` once when this process ends normally (also multiprocessing children)."""
    _exit_hooks.append(hook)


def exiting() -> bool:
    """True once this process runs its exit hooks (see the module docstring)."""
    return _exit_ran_in == _pid


def in_multiprocessing_child() -> bool:
    """True in a process started by ``multiprocessing`` (a Pool worker, say)."""
    import multiprocessing

    return multiprocessing.parent_process() is not None


def _run_exit_hooks() -> None:
    global _exit_ran_in
    if _exit_ran_in == _pid:
        return
    _exit_ran_in = _pid
    for hook in reversed(_exit_hooks):
        try:
            hook()
        except Exception:  # noqa: BLE001 - exit must go on; nothing useful to raise to
            pass
    global _exit_done_in
    _exit_done_in = _pid


def exit_done() -> bool:
    """Whether this process ran its exit hooks to the end: it may be stopped anywhere from
    now on (``os._exit``, interpreter teardown), so whatever still runs here (a daemon
    thread, a late finalizer) must take no shared lock."""
    return _exit_done_in == _pid


class _AfterForkToken:
    """Kept alive for ``multiprocessing.util.register_after_fork`` (it holds weak refs)."""


_after_fork_token = _AfterForkToken()


def _register_multiprocessing_finalizer(_: object = None) -> None:
    # multiprocessing's forked and forkserver children skip atexit (they end in os._exit)
    # but run util finalizers with an exit priority; spawn children run both. A child
    # started by multiprocessing clears the finalizers it inherited, then runs the
    # after-fork callbacks: so register again there.
    from multiprocessing import util

    util.Finalize(None, _run_exit_hooks, exitpriority=-1000)
    util.register_after_fork(_after_fork_token, _register_multiprocessing_finalizer)


def _after_fork_in_child() -> None:
    global _identity, _pid
    _pid = os.getpid()
    _identity = None
    for hook in _fork_hooks:
        hook()
    _register_multiprocessing_finalizer()


atexit.register(_run_exit_hooks)
_register_multiprocessing_finalizer()
os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
