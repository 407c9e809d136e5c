"""Owner-only objects: modes 0600/0700, and another user can neither read nor subscribe."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

import shmfeed
from shmfeed import _gc, _registry_client

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534


def _objects(namespace: str):
    feed = shmfeed.Feed("secure")
    channel = shmfeed.Channel()
    sub = feed.subscribe(channel)
    scope = shmfeed.SubscriptionScope("secure-scope")
    scope.track(sub)
    feed.send(1)
    with pytest.raises(TimeoutError):
        shmfeed.select(shmfeed.Channel(), timeout=0.01)  # makes a waker
    return feed, channel, sub, scope


def test_every_shared_object_is_owner_only(namespace):
    kept = _objects(namespace)
    entries = _gc.namespace_entries(namespace)
    assert any(e.startswith("sem.") for e in entries) and any(not e.startswith("sem.") for e in entries)
    for entry in entries:
        mode = stat.S_IMODE(os.stat(f"/dev/shm/{entry}").st_mode)
        assert mode == 0o600, f"{entry} has mode {oct(mode)}"
    directory = _registry_client.runtime_dir()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    del kept


_OTHER_USER_PROBE = r"""
import os, socket, sys
results = []
for path in sys.argv[2:]:
    try:
        open(path, "rb").read(1)
        results.append("read " + path)
    except PermissionError:
        pass
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    results.append("connected to the registry")
except OSError:
    pass
print("|".join(results) or "refused")
"""


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as another user")
def test_another_user_can_neither_read_nor_talk_to_the_registry(namespace, other_user_turn):
    kept = _objects(namespace)
    paths = [f"/dev/shm/{entry}" for entry in _gc.namespace_entries(namespace)]
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
         _OTHER_USER_PROBE, _registry_client.socket_path(namespace), *paths],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused"
    del kept


def test_a_registry_request_that_is_not_a_map_gets_an_error_answer(namespace):
    from shmfeed._registry import Registry

    registry = Registry(namespace, idle_seconds=1)
    assert registry.answer([1, 2])["ok"] is False
    assert registry.answer({"op": "explode"})["ok"] is False
    assert registry.answer({"op": "ping"})["ok"] is True
