"""Child-process bodies for tests/test_loan.py (importable under spawn and forkserver)."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import shmfeed


def digest(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern(size: int, seed: int) -> bytes:
    """``size`` bytes that differ from value to value (cheap to make and to check)."""
    block = hashlib.sha256(f"{seed}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def receive_digests(channel: shmfeed.Channel[bytes], count: int, results: Any) -> None:
    """Receive ``count`` values; put (type name, length, digest) of each on ``results``."""
    got = []
    for _ in range(count):
        value = channel.recv(timeout=30)
        got.append((type(value).__name__, len(value), digest(value)))
    results.put(got)


def loan_and_send(feed: shmfeed.Feed[bytes], sizes: list[int], seed: int) -> list[int]:
    """A worker's job: each value written in a loan of the feed, then sent."""
    delivered = []
    for index, size in enumerate(sizes):
        with feed.loan(size) as loan:
            loan.buffer[:] = pattern(size, seed + index)
            delivered.append(loan.send(timeout=30))
    return delivered


def loan_then_wait(feed: shmfeed.Feed[bytes], size: int, ready: Any) -> None:
    """Take a loan, write it, say so, then wait to be killed without sending it."""
    loan = feed.loan(size)
    loan.buffer[:] = b"\x01" * size
    ready.put(os.getpid())
    time.sleep(60)  # the test SIGKILLs this process
    loan.send()


def use_a_parents_loan(loan: shmfeed.Loan, results: Any) -> None:
    """A forked child tries the loan its parent took: refused, and the parent's is intact."""
    try:
        loan.send()
    except ValueError as error:
        results.put(str(error))
    else:
        results.put("sent")


def loan_and_send_async(feed: shmfeed.Feed[bytes], sizes: list[int], seed: int) -> list[int]:
    """``loan_and_send`` from an asyncio producer: each loan sent with ``send_async``."""
    import asyncio

    async def produce() -> list[int]:
        delivered = []
        for index, size in enumerate(sizes):
            with feed.loan(size) as loan:
                loan.buffer[:] = pattern(size, seed + index)
                delivered.append(await loan.send_async(timeout=30))
        return delivered

    return asyncio.run(produce())
