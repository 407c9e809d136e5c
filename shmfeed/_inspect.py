"""A read-only snapshot of a namespace, for the monitor and the registry's ``snapshot`` query.

It maps each segment read-only and copies its counters; it takes no lock and writes
nothing, so watching costs the data path nothing (a torn read only misreports a figure).
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Any

import psutil

from . import _gc
from . import _layout as L
from . import _names

_process_names: dict[tuple[int, int], str] = {}


def process_name(pid: int, ticks: int = 0) -> str:
    """A process's name (cached by pid and start time), '?' if it is gone."""
    key = (pid, ticks)
    if key not in _process_names:
        try:
            process = psutil.Process(pid)
            name = process.name()
            command = process.cmdline()
            if name.startswith("python") and len(command) > 1:
                if command[1] == "-m" and len(command) > 2:
                    name = f"{name} -m {command[2]}"
                elif command[1] == "-c":
                    name = f"{name} -c"
                else:
                    name = f"{name} {os.path.basename(command[1])}"
            _process_names[key] = name[:40]
        except psutil.Error:
            return "?"
    return _process_names[key]


def _process_list(pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    return [
        {"pid": pid, "name": process_name(pid, ticks), "alive": L.slot_alive(pid, ticks)}
        for pid, ticks in pairs
    ]


def _waiter_pids(words: memoryview, first_word: int) -> list[int]:
    return sorted({_names.waker_pid(int(words[w])) for w in range(first_word, first_word + L.WAITLIST_SLOTS) if words[w]})


def _map(path: str) -> mmap.mmap | None:
    try:
        mapped = _gc.map_segment(path, whole=True)
    except (OSError, ValueError):
        return None
    return mapped[0] if mapped is not None else None


def snapshot(namespace: str) -> dict[str, Any]:
    """Feeds, channels and scopes of the namespace with their counters and processes."""
    feeds: list[dict[str, Any]] = []
    channels: list[dict[str, Any]] = []
    scopes: list[dict[str, Any]] = []
    dead: set[int] = set()
    error_channels = 0
    for entry in _gc.own_entries(namespace):
        if entry.kind not in _names.SEGMENT_ENTRY_KINDS:
            continue
        mapping = _map(entry.path)
        if mapping is None:
            continue
        buffer = memoryview(mapping)
        words = buffer[: L.HEADER_BYTES].cast("Q")
        try:
            if words[L.DESTROYED]:
                continue
            attached = L.attached_processes(words)
            processes = _process_list(attached)
            dead.update(p["pid"] for p in processes if not p["alive"])
            magic = words[L.MAGIC]
            if magic == L.CHANNEL_MAGIC:
                if words[L.CHANNEL_FLAGS] & L.FLAG_ERROR_CHANNEL:
                    error_channels += 1
                else:
                    channels.append(_channel(entry.key, words, buffer, processes))
            elif magic == L.FEED_MAGIC and len(mapping) >= L.FEED_SEGMENT_BYTES:
                feeds.append(_feed(entry.key, words, buffer, processes))
            elif magic == L.SCOPE_MAGIC:
                scopes.append({
                    "name": L.read_text(buffer, L.FEED_NAME_OFFSET, int(words[L.SCOPE_NAME_LEN]), L.FEED_NAME_MAX),
                    "count": int(words[L.SCOPE_COUNT]),
                    "closed": bool(words[L.SCOPE_CLOSED]),
                    "processes": processes,
                })
        finally:
            words.release()
            buffer.release()
            mapping.close()
    return {
        "namespace": namespace,
        "time": time.time(),
        "feeds": feeds,
        "channels": channels,
        "scopes": scopes,
        "error_channels": error_channels,
        "dead_processes": sorted(dead),
        "leftovers": _gc.sweep(namespace, remove=False).all(),
    }


def _channel(channel_id: str, words: memoryview, buffer: memoryview, processes: list[dict[str, Any]]) -> dict[str, Any]:
    from ._ring import OVERFLOW_POLICIES

    sent, received = int(words[L.SENT]), int(words[L.RECEIVED])
    creator = int(words[L.CREATOR_PID])
    name_len = int(words[L.CHANNEL_NAME_LEN])
    return {
        "id": channel_id,
        "name": L.read_text(buffer, L.CHANNEL_NAME_OFFSET, name_len, L.CHANNEL_NAME_MAX) if name_len else None,
        "owner_pid": creator,
        "owner_name": process_name(creator, int(words[L.CREATOR_TICKS])),
        "elem_type": L.read_text(buffer, L.TYPE_NAME_OFFSET, int(words[L.ELEM_TYPE_LEN]), L.TYPE_NAME_MAX) or None,
        "capacity": int(words[L.CAPACITY]),
        "fill": max(0, sent - received),
        "ring_bytes": int(words[L.RING_BYTES]),
        "bytes_in_ring": max(0, int(words[L.WRITE_POS] - words[L.READ_POS])),
        "bytes_written": int(words[L.WRITE_POS]),
        "sent": sent,
        "received": received,
        "dropped": int(words[L.DROPPED]) + int(words[L.DISCARDED]),
        "evicted": int(words[L.EVICTED]),
        "overflow": OVERFLOW_POLICIES[int(words[L.OVERFLOW]) % len(OVERFLOW_POLICIES)],
        "closed": bool(words[L.CLOSED]),
        "waiting_senders": _waiter_pids(words, L.SEND_WAITLIST_WORD),
        "waiting_receivers": _waiter_pids(words, L.RECV_WAITLIST_WORD),
        "holders": _process_list(L.attached_processes(words, L.SLOT_HOLDER)),
        "readers": _readers(words),
        **_last_read(words),
        "processes": processes,
    }


def _readers(words: memoryview) -> list[dict[str, Any]]:
    """The processes that received from the channel (its readers table), latest first, with
    how long ago each last did; ``alive``: still attached and running."""
    now = time.monotonic_ns()
    attached = dict(L.attached_processes(words))
    found = []
    for pid, stamp in L.readers(words):
        ticks = attached.get(pid)
        alive = ticks is not None and L.slot_alive(pid, ticks)
        found.append({
            "pid": pid,
            "name": process_name(pid, ticks) if alive and ticks is not None else "?",  # else: maybe reused
            "alive": alive,
            "seconds_ago": round(max(0.0, (now - stamp) / 1e9), 1),
        })
    return found


def _last_read(words: memoryview) -> dict[str, Any]:
    """Who received last and when; ``no_reader_s``: seconds since a receiver was last seen,
    if the last one is gone (or none ever read), else None."""
    pid = int(words[L.LAST_RECV_PID]) & L.SLOT_PID_MASK
    stamp = int(words[L.LAST_RECV_TIME])
    ago = max(0.0, (time.monotonic_ns() - stamp) / 1e9) if stamp else None
    ticks = next((t for p, t in L.attached_processes(words) if p == pid), None) if pid else None
    alive = ticks is not None and L.slot_alive(pid, ticks)
    last = {"pid": pid, "name": process_name(pid, ticks or 0), "alive": alive, "seconds_ago": ago} if pid else None
    if alive:
        no_reader = None
    elif ago is not None:
        no_reader = round(ago, 1)
    else:  # never read: since the channel was made, as far as the creator's start tells
        no_reader = None
    return {"last_receiver": last, "no_reader_s": no_reader, "never_read": not pid}


def _feed(key: str, words: memoryview, buffer: memoryview, processes: list[dict[str, Any]]) -> dict[str, Any]:
    table = buffer[L.HEADER_BYTES : L.FEED_SEGMENT_BYTES].cast("Q")
    try:
        subscriptions = [{"channel": f"{sub.channel_id:016x}", "owner_pid": sub.owner_pid}
                         for sub in L.active_subscriptions(words, table)]
    finally:
        table.release()
    name_len = int(words[L.NAME_LEN])
    return {
        "key": key,
        "name": L.read_text(buffer, L.FEED_NAME_OFFSET, name_len, L.FEED_NAME_MAX) if name_len else None,
        "elem_type": L.read_text(buffer, L.TYPE_NAME_OFFSET, int(words[L.FEED_TYPE_LEN]), L.TYPE_NAME_MAX) or None,
        "sent": int(words[L.SENDS]),
        "delivered": int(words[L.DELIVERED]),
        "closed": bool(words[L.FEED_CLOSED]),
        "senders": _process_list(L.attached_processes(words, L.SLOT_SENDER)),
        "send_lock_holder": int(words[L.SEND_LOCK_OWNER]) or None,
        "subscriptions": subscriptions,
        "processes": processes,
    }
