"""Letting go of everything this process holds in a namespace (used at exit and by tests)."""

from __future__ import annotations

import sys

from . import _feed, _ring, _scope, _spill, _waker


def release_namespace(namespace: str) -> None:
    """End this process's subscriptions in ``namespace`` and detach all its objects there.

    Objects of that namespace still referenced become unusable. Other processes are not
    affected, except that the last process to detach an object unlinks it.
    """
    _scope.release_namespace(namespace)
    _feed.release_namespace(namespace)
    _ring.release_namespace(namespace)
    aio = sys.modules.get(f"{__package__}._aio")  # loaded only once something awaited
    if aio is not None:
        aio.stop(namespace)
    _waker.destroy_wakers(namespace)
    _spill.release_pools(namespace)
