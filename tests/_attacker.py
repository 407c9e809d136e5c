"""Run Python code as another local user: the attacker of the security tests.

Tests run as root in CI; the attacker is ``nobody`` (uid 65534), started with
``subprocess.Popen(..., user=...)`` and the system interpreter, since root's own Python and
site-packages may sit in a 0700 home. shmfeed and its dependencies are copied into a
world-readable directory that becomes the attacker's ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Iterator

import pytest

NOBODY = 65534
VICTIM = 40001  # an unprivileged victim, for what root cannot stand for (its own /tmp dir)
SYSTEM_PYTHON = "/usr/bin/python3"
_PACKAGES = ("shmfeed", "msgpack", "posix_ipc", "psutil")
_TURN_LOCK = os.path.join(tempfile.gettempdir(), "shmfeed-tests-other-user.lock")


@contextlib.contextmanager
def turn() -> Iterator[None]:
    """Hold the other user for one test. Tests clean up after it by killing every process
    of ``nobody`` and removing its files, which would end another test's attacker, or its
    planted file, midway: pytest-xdist runs two tests at once, so each waits its turn."""
    with open(_TURN_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def skip_reason() -> str | None:
    """Why users cannot be switched here; None if they can."""
    if os.getuid() != 0:
        return "needs root to start processes as other users"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"needs {SYSTEM_PYTHON} for the other user"
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    if version != str(sys.version_info[:2]):
        return f"{SYSTEM_PYTHON} is {version}, the extensions are built for {sys.version_info[:2]}"
    return None


def make_library_copy() -> str:
    """A world-readable directory holding shmfeed and its dependencies."""
    directory = tempfile.mkdtemp(prefix="shmfeed-attacker-")
    os.chmod(directory, 0o755)
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, name
        if spec.submodule_search_locations:
            source = os.path.dirname(spec.origin)
            shutil.copytree(source, os.path.join(directory, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.c", "tests"))
        else:
            shutil.copy(spec.origin, directory)
    for root, dirs, files in os.walk(directory):
        for entry in dirs:
            os.chmod(os.path.join(root, entry), 0o755)
        for entry in files:
            os.chmod(os.path.join(root, entry), 0o644)
    return directory


class OtherUser:
    """Runs code as ``uid``; each ``start`` is one process speaking lines on stdin/stdout."""

    def __init__(self, library: str, uid: int = NOBODY, home: str = "/nonexistent") -> None:
        self.library = library
        self.uid = uid
        self.home = home
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, code: str, *args: str, namespace: str | None = None, cwd: str = "/",
              env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        environment = {"PATH": "/usr/bin:/bin", "HOME": self.home, "PYTHONPATH": self.library,
                       "PYTHONDONTWRITEBYTECODE": "1", "SHMFEED_REGISTRY_IDLE": "0.5", **(env or {})}
        if namespace is not None:
            environment["SHMFEED_NAMESPACE"] = namespace
        process = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", code, *args], user=self.uid, group=self.uid, extra_groups=[],
            env=environment, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        self.processes.append(process)
        return process

    def run(self, code: str, *args: str, timeout: float = 60.0, **options: Any) -> str:
        """Run ``code`` to its end; its stdout (the test fails on a non-zero status)."""
        process = self.start(code, *args, **options)
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, f"the other user's program failed:\n{err}"
        return out

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)


def say(process: subprocess.Popen[str], line: str) -> None:
    assert process.stdin is not None
    process.stdin.write(line + "\n")
    process.stdin.flush()


def hear(process: subprocess.Popen[str]) -> str:
    """The next line the process printed (the test's timeout bounds the wait)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=30)
        assert process.stderr is not None
        pytest.fail(f"the other user's program ended early:\n{process.stderr.read()}")
    return line.strip()


def remove_files_of(uid: int, directory: str = "/dev/shm", start: str = "") -> None:
    """Remove what ``uid`` left in ``directory`` (names starting with ``start``)."""
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        try:
            if entry.startswith(start) and os.lstat(path).st_uid == uid:
                os.unlink(path)
        except FileNotFoundError:
            pass
