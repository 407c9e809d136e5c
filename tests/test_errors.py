"""Errors: their classes across processes, unknown types on receipt, where an unencodable
part is, one message shape, and where error classes say they live (issue 14)."""

from __future__ import annotations

import ast
import dataclasses
import multiprocessing
import os
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import _error_workers as W
import shmfeed

pytestmark = pytest.mark.timeout(60)

WAIT = 30.0


def _result(results: shmfeed.Channel) -> Any:
    message = results.recv(timeout=WAIT)
    assert message[0] != "error", message[1]
    return message


def _spawned(target: Any, *args: Any) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


# --- an error on err() from another process keeps its class ------------------------------


def test_errors_from_another_process_keep_their_class_and_attributes(namespace: str) -> None:
    feed = shmfeed.Feed("failing")
    channels = [shmfeed.Channel(capacity=4) for _ in range(4)]
    subs = [feed.subscribe(channel) for channel in channels]  # table entries 0..3, in order
    results: shmfeed.Channel = shmfeed.Channel(capacity=4)
    process = _spawned(W.fail_every_subscription, namespace, results, "failing")
    try:
        assert _result(results) == ("done", 4)
    finally:
        process.join(WAIT)
    assert process.exitcode == 0
    type_error, timeout, unknown, died = (sub.err().recv(timeout=WAIT) for sub in subs)

    assert type(type_error) is shmfeed.FeedTypeError and isinstance(type_error, TypeError)
    assert str(type_error) == "event: wrong type in Send got str, want int"
    assert (type_error.op, type_error.got, type_error.want) == ("Send", "str", "int")

    assert type(timeout) is shmfeed.FeedSendTimeout and isinstance(timeout, TimeoutError)
    assert (timeout.delivered, timeout.pending) == (2, ("ab", "cd"))

    assert type(unknown) is shmfeed.UnknownTypeError and unknown.type_name == "app.Point"
    again = pickle.loads(pickle.dumps(unknown))  # a Pool task raising it, say
    assert (type(again), str(again), again.type_name) == (type(unknown), str(unknown), "app.Point")
    assert type(died) is shmfeed.SenderDiedError and str(died).startswith("shmfeed: the feed's last")
    feed.close()
    for channel in channels + [results]:
        channel.close()


def test_an_error_channel_names_only_exported_errors(namespace: str) -> None:
    from shmfeed import _codec, _subscription

    forged = _codec.encode({"error": "SystemExit", "message": "bye", "args": ["bye"], "attrs": {"code": 3}})
    error = _subscription.decode_error(_codec.decode(forged))
    assert type(error) is shmfeed.ShmfeedError and str(error) == "bye"
    private = _codec.encode({"error": "LockBusy", "message": "m"})  # a library class, not exported
    assert type(_subscription.decode_error(_codec.decode(private))) is shmfeed.ShmfeedError
    assert type(_subscription.decode_error(7)) is shmfeed.ShmfeedError


# --- a value of a type the receiver does not know -----------------------------------------


@dataclasses.dataclass
class Secret:  # defined here only: the spawned receiver never imports this module
    code: int


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents


def test_a_value_of_an_unknown_type_is_dropped_and_the_channel_goes_on(namespace: str) -> None:
    shmfeed.register_type(Money, lambda m: m.cents, lambda c: Money(c))  # here only
    feed = shmfeed.Feed("orders")
    results: shmfeed.Channel = shmfeed.Channel(capacity=4)
    process = _spawned(W.receive_unknown_then_known, namespace, results, "orders", 4)
    try:
        assert _result(results) == ("ready",)
        for value in (1, Secret(7), Money(250), 2):  # one feed carries one type: dicts
            assert feed.send({"v": value}, timeout=WAIT) == 1  # the sender sees success each time
        _, got, running = _result(results)
    finally:
        process.join(WAIT)
    assert process.exitcode == 0
    assert got[0] == ("value", {"v": 1}) and got[3] == ("value", {"v": 2})  # before and after: nothing else lost
    (kind, name, message, corrupt), money = got[1], got[2]
    assert (kind, name, corrupt) == ("unknown", "test_errors.Secret", False)
    assert "'test_errors.Secret'" in message and "dropped" in message and "import its module" in message
    assert money[:2] == ("unknown", "test_errors.Money") and "register_type" in money[2]
    assert running == "running"  # the subscription did not fail
    feed.close()
    results.close()


# --- where in a value the unencodable part is ---------------------------------------------


class Unknown:
    """No encoding for it: the bad part the tests hide in values."""


@dataclasses.dataclass
class Order:
    qty: int
    price: Any


class Quote(NamedTuple):
    symbol: str
    bid: Any


@pytest.mark.parametrize("value, path", [
    ({"orders": [Order(1, 2.0), Order(2, 3.0), Order(3, 4.0), Order(4, Unknown())]}, 'value["orders"][3].price'),
    ([1, (2, Quote("X", {"bid": Unknown()}))], 'value[1][1].bid["bid"]'),
    ({"tags": {1, Unknown()}}, 'value["tags"]{...}'),
    ({7: {(1, Unknown()): "k"}}, "value[7].keys() holding (1, "),
    (Unknown(), "value"),
])
def test_an_encoding_error_says_where_the_bad_part_is(value: Any, path: str) -> None:
    channel: shmfeed.Channel = shmfeed.Channel(capacity=4)
    with pytest.raises(shmfeed.EncodingError) as raised:
        channel.send(value)
    message = str(raised.value)
    assert message.startswith(f"shmfeed: cannot encode {path}"), message
    assert "test_errors.Unknown is not one shmfeed encodes" in message and "register_type" in message
    assert raised.value.path.startswith(path)  # type: ignore[attr-defined]
    assert len(channel) == 0
    channel.send({"fine": 1})  # nothing of the failed value is left in the encoder
    assert channel.recv(timeout=0) == {"fine": 1}
    channel.close()


def test_a_feed_send_names_the_bad_part_of_a_large_value_too() -> None:
    feed = shmfeed.Feed()
    channel: shmfeed.Channel = shmfeed.Channel(capacity=4)
    feed.subscribe(channel)
    blob = b"x" * (1 << 20)
    assert feed.send({"blob": blob, "meta": [1]}) == 1  # the sender now encodes for large values
    with pytest.raises(shmfeed.EncodingError, match=r'cannot encode value\["meta"\]\[1\]: type '):
        feed.send({"blob": blob, "meta": [1, Unknown()]})
    assert channel.recv(timeout=0)["meta"] == [1] and len(channel) == 0
    feed.close()
    channel.close()


# --- set_namespace: one namespace per application -----------------------------------------


def test_set_namespace_moves_a_program_and_its_spawn_children(namespace: str) -> None:
    from conftest import _wait_out_destruction

    from shmfeed import _gc, _release

    app = f"{namespace}-app"
    here = shmfeed.Feed("events")  # the same feed name, in the test's namespace
    mine: shmfeed.Channel = shmfeed.Channel(capacity=4)
    here.subscribe(mine)
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    program = context.Process(target=W.app_main, args=(app, child_end))
    program.start()
    try:
        assert parent_end.poll(WAIT), "the program did not answer"
        kind, outcome = parent_end.recv()
        assert kind == "done", outcome
    finally:
        program.join(WAIT)
    assert program.exitcode == 0
    assert outcome["env"] == app
    assert outcome["child"] == (app, 1) and outcome["child_exit"] == 0  # the child agreed
    assert outcome["received"] == "hello from the child"
    assert outcome["late"].startswith(f"shmfeed: set_namespace({app + '-other'!r}) comes after")
    assert len(mine) == 0  # nothing crossed into the other namespace's "events"
    here.close()
    mine.close()
    _release.release_namespace(app)
    left = _wait_out_destruction(app)
    if left:
        _gc.sweep(app)
    assert not left, f"left in /dev/shm: {left}"


def test_set_namespace_validates_and_refuses_once_objects_exist(namespace: str) -> None:
    from shmfeed import _names

    with pytest.raises(ValueError, match="namespace"):
        shmfeed.set_namespace("")
    with pytest.raises(TypeError, match="namespace"):
        shmfeed.set_namespace(42)  # type: ignore[arg-type]
    shmfeed.Channel(capacity=1).close()  # this process has used a namespace by now
    used = _names._first_used
    assert used is not None
    with pytest.raises(RuntimeError, match="before any shmfeed object is made"):
        shmfeed.set_namespace(used + "-elsewhere")
    assert os.environ["SHMFEED_NAMESPACE"] == namespace  # nothing was changed
    if used == namespace:  # the first test of this process: the same name again is fine
        shmfeed.set_namespace(used)


# --- one message shape: "shmfeed: <what went wrong>; <what to do>" ------------------------

_SHAPE = re.compile(r"^shmfeed: [^;]+; .+")
# Raise sites whose text is not a user's message, with why (module, start of the text).
_NOT_MESSAGES = {
    ("__init__", "module 'shmfeed' has no attribute"): "Python's own wording for a missing attribute",
    ("_channel", "__orig_class__"): "typing protocol, not a message",
    ("_channel", "channel reference too short"): "wrapped in the ChannelCorruptError of the ext decoder",
    ("_registry", "connection closed before"): "registry framing, answered, never raised to a user",
    ("_registry", "request of "): "registry framing, answered, never raised to a user",
    ("_registry_client", "frame of "): "becomes the RegistryUnavailableError's detail",
    ("_registry_client", "undecodable frame"): "becomes the RegistryUnavailableError's detail",
    ("_registry_client", "connection closed mid-frame"): "becomes the RegistryUnavailableError's detail",
    ("_shm", "semaphore "): "posix_ipc.BusyError, caught by the lock's callers",
    ("_spill", "the record says"): "the detail in parentheses of a ChannelCorruptError",
    ("_spill", "the file changed"): "the detail in parentheses of a ChannelCorruptError",
    ("_ring", "write position "): "the detail in parentheses of a ChannelCorruptError (a damaged header)",
    ("testing", "{}: not reached in"): "a test's own assertion, in the test's words",
    # Channel's constructor checks are being reworked with Channel(64) (issue 14, same
    # issue, other change): they keep their own text until that lands.
    ("_channel", "shmfeed: elem_type must be a type or None"): "Channel() argument checks",
    ("_channel", "shmfeed: capacity must be an int"): "Channel() argument checks",
    ("_channel", "shmfeed: buffer_size must be an int"): "Channel() argument checks",
}


def _literal(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def test_every_raised_message_has_one_shape() -> None:
    # Statically: the literal text of every exception built in the package.
    package = Path(shmfeed.__file__).parent
    checked, wrong = 0, []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if not name.endswith(("Error", "Closed", "Timeout", "Exit")) or name == "FeedTypeError":
                continue  # FeedTypeError builds geth's text from its parts
            text = next((t for t in map(_literal, node.args[:2]) if t is not None), None)
            if text is None:
                continue
            checked += 1
            if text.startswith("event: ") or _SHAPE.match(text):
                continue
            if not any(path.stem == module and text.startswith(start) for module, start in _NOT_MESSAGES):
                wrong.append(f"{path.name}:{node.lineno}: {text[:90]}")
    assert checked > 80, "the scan found too few messages: it checks nothing"
    assert wrong == []


def test_representative_errors_say_what_to_do() -> None:
    from shmfeed import _codec, _layout, _shm

    channel: shmfeed.Channel = shmfeed.Channel(capacity=1)
    feed = shmfeed.Feed()
    feed.subscribe(channel)
    feed.send(1)
    raised: list[BaseException] = []
    for call in (
        lambda: channel.send(2, timeout=0.01),  # full
        lambda: shmfeed.Channel(capacity=1).recv(timeout=0),
        lambda: shmfeed.select(channel, timeout=0) and shmfeed.select(channel, timeout=0),
        lambda: feed.send(Unknown()),
        lambda: _codec.decode(b"\xc1"),  # no msgpack value
        lambda: _codec.decode(_codec.encode([1])[:-1] + b"\xd4\x63\x00"),
        lambda: shmfeed.register_type(int, str, str),
        lambda: shmfeed.resubscribe(1, None),
        lambda: shmfeed.Feed(elem_type=3),  # type: ignore[call-overload]
    ):
        with pytest.raises(Exception) as info:
            call()
        raised.append(info.value)
    timeout_error = shmfeed.FeedSendTimeout.of_send("'f'", 1.0, 1, [("c1", "full")])
    others = [
        timeout_error,
        _shm.lock_timeout("the send lock of feed 'f'", 1),
        shmfeed.TableFullError(_layout.table_full_message("channel c1")),
        shmfeed.UnknownTypeError("app.Point"),
    ]
    for error in raised + others:
        assert _SHAPE.match(str(error)), f"{type(error).__name__}: {error}"
    # geth's texts where the SPEC quotes them, exactly.
    assert str(shmfeed.MuxClosedError()) == "event: mux closed"
    assert str(shmfeed.FeedTypeError("Send", "str", "int")) == "event: wrong type in Send got str, want int"
    with pytest.raises(TypeError, match="^event: Subscribe argument does not have sendable channel type$"):
        feed.subscribe(3)  # type: ignore[arg-type]
    feed.close()
    channel.close()
