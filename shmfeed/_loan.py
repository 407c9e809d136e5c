"""``Loan``: a ``bytes`` value written in place, in the shared memory it travels in.

``Feed.loan(size)`` takes a spill file from this process's pool (``_spill.lend``), writes
the msgpack header of a ``bytes`` value of ``size`` bytes at its start (``_codec``), and
lends the rest as a writable buffer. ``send()`` links that file into each channel as an ordinary send
links a spilled value: the sender copies nothing, and a receiver gets a ``bytes`` (``recv``)
or a view of the file (``recv_view``), as for any value.

The buffer is a ``Pin`` (``_accel.c``) that counts what was made from it: a loan is sent only
once nothing the user made from the buffer (a slice, a NumPy array) is alive, so nothing can
write into a file receivers are reading. Without the C accelerator the buffer is a plain
memoryview of the mapping, and only the buffer itself is let go of at the send.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _codec, _native, _process, _spill

if TYPE_CHECKING:
    from ._feed import Feed

MAX_LOAN_BYTES = 0xFFFF_FFFF  # msgpack's largest bin


class Loan:
    """A writable buffer in shared memory for one ``bytes`` value of a feed, written in
    place and sent without a copy. Made by :meth:`Feed.loan`.

    Write the value into :attr:`buffer` (slices, ``numpy.frombuffer(loan.buffer, ...)``),
    then call :meth:`send`: every subscriber receives ``bytes`` of the buffer's content, as
    if ``feed.send(bytes(loan.buffer))`` had been called, but the value was never copied in
    this process. A loan is sent at most once; used as a context manager, leaving the block
    without ``send()`` gives the buffer back unsent.

    Before ``send()``, let go of everything made from the buffer (slices, arrays): the send
    refuses with ``BufferError`` while one is alive, because it could still write into the
    value receivers are reading. After the send (or ``discard()``), ``buffer`` raises.
    """

    def __init__(self, feed: "Feed[Any]", namespace: str, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"shmfeed: loan size must be an int, not {type(size).__name__}; give the value's length "
                            f"in bytes")
        if not 0 < size <= MAX_LOAN_BYTES:
            raise ValueError(f"shmfeed: loan size must be 1 to {MAX_LOAN_BYTES} bytes, not {size}; a larger value "
                             f"goes by feed.send()")
        header = _codec.bin32_header(size)
        self._feed = feed
        self._namespace = namespace
        self._pid = _process.pid()
        self._size = size
        self._encoded_size = len(header) + size
        self._file: _spill._PoolFile | None = _spill.lend(namespace, self._encoded_size)
        mapping = self._file.mapping
        assert mapping is not None  # lend() maps it
        mapping[: len(header)] = header
        self._pin: Any = None
        if _native.accel is not None:
            self._pin = _native.accel.Pin(mapping, len(header), size, _nothing, True)
            self._buffer: memoryview | None = memoryview(self._pin)
        else:
            self._buffer = memoryview(mapping)[len(header) : self._encoded_size]

    @property
    def buffer(self) -> memoryview:
        """The value's bytes, writable, in shared memory (``size`` of them, zeros or what a
        value sent before left there: write all of it)."""
        if self._buffer is None:
            raise ValueError("shmfeed: this loan was sent or discarded; take a new one with feed.loan(size)")
        return self._buffer

    @property
    def size(self) -> int:
        """The value's length in bytes."""
        return self._size

    def send(self, timeout: float | None = None) -> int:
        """Send the buffer's content as one ``bytes`` value, as :meth:`Feed.send` would;
        the loan ends here, whatever the send raises.

        Returns:
            How many channels the value was delivered to (as :meth:`Feed.send`).

        Raises:
            BufferError: a slice or array made from ``buffer`` is still alive (the loan
                stays usable: let go of it and send again).
            ValueError: the loan was sent or discarded already, or belongs to another
                process (a loan does not cross ``fork``).
            FeedTypeError, FeedClosed, FeedSendTimeout: as :meth:`Feed.send`.
        """
        payload = self._lent_value()
        try:
            return self._feed._send_lent(payload, timeout)
        finally:
            self._sent(payload)

    async def send_async(self, timeout: float | None = None) -> int:
        """:meth:`send` for asyncio code: waits for room as :meth:`Feed.send_async` does,
        without blocking the event loop, with its rules for cancellation (cancelled before
        any channel took the value, nobody gets it). The loan ends here in any case.

        Raises:
            as :meth:`send`, and ``asyncio.CancelledError``.
        """
        payload = self._lent_value()
        try:
            return await self._feed._send_lent_async(payload, timeout)
        finally:
            self._sent(payload)

    def _lent_value(self) -> _spill.Lent:
        """The loan's value, for its one send (the buffer let go of first)."""
        self._check_usable()
        self._let_go_of_buffer()
        assert self._file is not None
        return _spill.Lent(self._file, self._encoded_size)

    def _sent(self, payload: _spill.Lent) -> None:
        """After the send, whatever it raised: the file goes back to the pool."""
        view = payload.parts[0]
        assert isinstance(view, memoryview)
        view.release()
        self._end()

    def discard(self) -> None:
        """Give the buffer back unsent (nothing happens if the loan was sent already)."""
        if self._file is None or self._pid != _process.pid():
            return
        if self._buffer is not None:
            try:
                self._let_go_of_buffer()
            except BufferError:
                pass  # an array still writes there: the file leaves the pool (unlinked)
        self._end(keep=self._pin is None or self._pin.exports == 0)

    def __enter__(self) -> "Loan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None and not _process.exiting():
            self.discard()

    def __reduce__(self) -> Any:
        raise TypeError("shmfeed: a Loan belongs to the process that took it and cannot be pickled; send it "
                        "here, or take a loan with feed.loan(size) in the other process")

    def __repr__(self) -> str:
        return f"<shmfeed.Loan of {self._size} bytes{', ended' if self._file is None else ''}>"

    def _check_usable(self) -> None:
        if self._pid != _process.pid():
            raise ValueError("shmfeed: this loan belongs to the process that took it (a loan does not cross fork); "
                             "take one with feed.loan(size) in this process")
        if self._file is None:
            raise ValueError("shmfeed: this loan was sent or discarded; take a new one with feed.loan(size)")

    def _let_go_of_buffer(self) -> None:
        """Release the buffer; BufferError (the buffer kept) if something made from it lives."""
        buffer = self._buffer
        if buffer is None:
            return
        try:
            buffer.release()
        except BufferError:
            raise BufferError("shmfeed: an array made from loan.buffer is still alive; delete it before "
                              "loan.send(), so nothing can write into the value once receivers read it") from None
        if self._pin is not None and self._pin.exports:
            self._buffer = memoryview(self._pin)  # still lent: the user may let go and retry
            raise BufferError(f"shmfeed: {self._pin.exports - 1} slice(s) or array(s) made from loan.buffer are "
                              f"still alive; delete them before loan.send(), so nothing can write into the value "
                              f"once receivers read it")
        self._buffer = None

    def _end(self, keep: bool = True) -> None:
        file, self._file = self._file, None
        self._pin = None
        if file is not None:
            _spill.give_back(self._namespace, file, keep)


def _nothing() -> None:
    """A loan's Pin needs no release action: the loan gives the file back itself."""
