"""A bridge the registry keeps (SPEC §7, ``SHMFEED_BRIDGE_URL``): no extra process for the
user to supervise.

When the process that starts a namespace's registry has ``SHMFEED_BRIDGE_URL`` in its
environment, the registry runs ``shmfeed bridge <that URL> --namespace <ns>`` as its child
(``SHMFEED_BRIDGE_ARGS``: more options, such as ``--durable --feed 'prices*'``), started
again after a backoff whenever it exits, and stopped (SIGTERM) when the registry leaves.
The child dies with the registry (``PR_SET_PDEATHSIG``): a registry killed with SIGKILL
leaves no bridge behind for the next registry to double.

A kept bridge holds the feeds it bridges open, so it would keep the namespace busy for
ever: the registry counts the namespace idle once the bridge is the only process using it,
stops the bridge, and then leaves as usual. Its output goes to ``bridge-<token>.log`` in
the user's runtime directory (0600), restarted at each start of the bridge and removed
after a clean stop.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time

from . import _names, _registry_client, _runtime

URL_ENV = "SHMFEED_BRIDGE_URL"
ARGS_ENV = "SHMFEED_BRIDGE_ARGS"
BACKOFF = (0.5, 30.0)  # seconds before the first restart, and the longest wait between two
STOP_SECONDS = 15.0  # a bridge's SIGTERM drain, then SIGKILL
_PR_SET_PDEATHSIG = 1



def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the registry (its parent) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class KeptBridge:
    """The registry's bridge child: started, watched, restarted, stopped."""

    def __init__(self, namespace: str, url: str, options: list[str]) -> None:
        self.namespace = namespace
        self.url = url
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self.restart_at = 0.0  # monotonic; when it may be started (again)
        self.backoff = BACKOFF[0]
        self.started_at = 0.0
        self.starts = 0

    @classmethod
    def from_environment(cls, namespace: str) -> "KeptBridge | None":
        url = os.environ.get(URL_ENV, "").strip()
        if not url:
            return None
        return cls(namespace, url, shlex.split(os.environ.get(ARGS_ENV, "")))

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def log_path(self) -> str:
        return os.path.join(_runtime.runtime_dir(), f"bridge-{_names.namespace_token(self.namespace)}.log")

    def start(self) -> int:
        """Start the bridge; its pidfd, for the registry to watch."""
        log = os.open(self.log_path(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            path = [entry for entry in sys.path if entry and os.path.isabs(entry)]
            self.process = subprocess.Popen(
                _registry_client.isolated_command("shmfeed._cli", path, ["bridge", self.url, "--namespace",
                                                                         self.namespace, *self.options]),
                cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_die_with_parent,
            )
        finally:
            os.close(log)
        self.started_at = time.monotonic()
        self.starts += 1
        self.pidfd = os.pidfd_open(self.process.pid)
        return self.pidfd

    def exited(self) -> None:
        """Its pidfd is readable: reap it and plan the restart (backoff doubling while it
        keeps dying within a minute of its start)."""
        if self.process is not None:
            self.process.wait()
        self._close_pidfd()
        if time.monotonic() - self.started_at > 60.0:
            self.backoff = BACKOFF[0]
        self.restart_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF[1])
        self.process = None

    def stop(self) -> None:
        """SIGTERM (it drains what it holds), SIGKILL if it takes over STOP_SECONDS."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.returncode == 0:  # a clean stop: nothing in its log to look at
                try:
                    os.unlink(self.log_path())
                except OSError:
                    pass
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
