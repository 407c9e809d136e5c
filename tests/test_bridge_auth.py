"""A bridge's credentials and TLS (SPEC §7), against a real nats-server per test: user and
password in the URL, a creds file (operator mode, made here), TLS with a CA made here and
mutual TLS; wrong credentials and an unreachable server give one clear line and a retry,
never a traceback or a loop of lines; secrets are never printed."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import shmfeed
from shmfeed import _bridge_connect
from shmfeed._bridge_connect import ConnectOptions, redacted
from shmfeed.testing import wait_until

from _nats import BridgeProcess, NatsServer, free_port, operator_creds, tls_files
from test_bridge import Subscriber, hosts, in_namespace  # noqa: F401  (hosts: a fixture)

pytestmark = pytest.mark.timeout(60)

PASSWORD = "s3cret"
AUTH_CONFIG = f"authorization {{ user: a, password: {PASSWORD} }}"


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    """Makes the test's nats-server (not started: the test may choose its port first),
    with ``extra_config``; stopped at the end."""
    made: list[NatsServer] = []

    def make(extra_config: str = "") -> NatsServer:
        made.append(NatsServer(tmp_path / "jetstream", extra_config=extra_config))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def _with_password(url: str, password: str) -> str:
    return url.replace("nats://", f"nats://a:{password}@")


def _crosses(url: str, b: str, bridge_b_options: list[str], **bridge_a: str | None) -> tuple[BridgeProcess, str]:
    """A ``shmfeed bridge`` process in namespace ``b`` (with ``bridge_b_options``) and a
    ``Bridge`` here (with ``bridge_a``): a value sent here reaches b, one sent in b reaches
    here. Returns b's stopped process and the server this side's statistics show."""
    local = Subscriber("prices")
    with in_namespace(b):
        remote = Subscriber("prices")
    process = BridgeProcess(url, b, ["prices"], options=bridge_b_options)
    try:
        with shmfeed.Bridge(url, feeds=["prices"], **bridge_a) as bridge:  # type: ignore[arg-type]
            feed = shmfeed.Feed("prices")
            with in_namespace(b):
                feed_b = shmfeed.Feed("prices")
            feed.send({"marker": "from a"})
            assert remote.until({"from a"}) == [{"marker": "from a"}]
            feed_b.send({"marker": "from b"})
            assert local.until({"from a", "from b"}) == [{"marker": "from a"}, {"marker": "from b"}]  # its own, then b's
            server_shown = bridge.statistics().server
            assert bridge.statistics().connected
            feed.detach()
            feed_b.detach()
        assert process.terminate() == 0, process.stderr
        assert process.stdout.startswith("stopped: "), process.stdout
        return process, server_shown
    finally:
        process.end()
        local.close()
        remote.close()


def _wait_for_failure_line(process: BridgeProcess) -> str:
    line = process.stderr_line(15)
    assert line.startswith("shmfeed bridge: cannot connect to "), line
    with pytest.raises(subprocess.TimeoutExpired):
        process.process.wait(2)  # still running: retrying, not exited
    return line


def _stopped_without_connecting(process: BridgeProcess) -> list[str]:
    """SIGTERM a bridge that never connected: exit 0, nothing on stdout, a few clear lines."""
    assert process.terminate() == 0
    assert process.stdout == ""
    lines = process.stderr.splitlines()
    assert "Traceback" not in process.stderr
    assert lines and lines[-1].startswith("shmfeed bridge: stopped before it could connect"), lines
    assert len(lines) <= 2, lines  # after the first: one per other kind of failure, not one per attempt
    return lines


# --- user and password in the URL ------------------------------------------------------------


def test_user_and_password_in_the_url_carry_values_and_are_never_printed(make_server: Callable[..., NatsServer],
                                                                          hosts: list[str]) -> None:  # noqa: F811
    nats = make_server(AUTH_CONFIG)
    url = _with_password(nats.start(), PASSWORD)
    process, shown = _crosses(url, hosts[1], [])
    assert shown == f"nats://***@127.0.0.1:{nats.port}"
    assert f"nats://***@127.0.0.1:{nats.port}" in process.ready_line
    for text in (process.ready_line, process.stdout, process.stderr, shown):
        assert PASSWORD not in text


def test_a_wrong_password_is_said_once_and_retried_until_stopped(make_server: Callable[..., NatsServer], hosts: list[str],  # noqa: F811
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    nats = make_server(AUTH_CONFIG)
    url = _with_password(nats.start(), "wr0ngpass")
    process = BridgeProcess(url, hosts[1], ["prices"], ready=False)
    try:
        line = _wait_for_failure_line(process)
        assert "NATS refused the credentials" in line and "--creds" in line, line
        lines = _stopped_without_connecting(process)
        assert all("wr0ngpass" not in one and PASSWORD not in one for one in lines)
        assert lines == [f"shmfeed bridge: stopped before it could connect to {redacted(url)}; nothing was bridged"]
    finally:
        process.end()
    # The Python API: start() gives up after its timeout, with the same reason.
    with pytest.raises(shmfeed.ShmfeedError) as caught:
        shmfeed.Bridge(url, feeds=["prices"]).start(timeout=0.5)
    message = str(caught.value)
    assert "refused the credentials" in message and "wr0ngpass" not in message, message
    assert "Traceback" not in capsys.readouterr().err


# nats-py 2.16 leaves the socket of a reconnection attempt the server refused unclosed
# (its reconnect loop does not close the transport on an authorization error): not ours.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_credentials_refused_after_a_restart_are_said_once_not_at_every_attempt(
        make_server: Callable[..., NatsServer], capsys: pytest.CaptureFixture[str]) -> None:
    """nats-py calls error_cb at every reconnection attempt: a server back with other
    credentials gives one line, however many attempts it refuses."""
    nats = make_server(AUTH_CONFIG)
    url = _with_password(nats.start(), PASSWORD)
    config = nats.store.parent / "nats-server.conf"
    said: list[str] = []

    def refusals() -> list[str]:
        said.extend(capsys.readouterr().err.splitlines())
        return [line for line in said if "refused the credentials" in line]

    with shmfeed.Bridge(url, feeds=["prices"]) as bridge:
        nats.stop()
        wait_until(lambda: not bridge.statistics().connected, 10, "the bridge saw NATS go")
        config.write_text(config.read_text().replace(PASSWORD, "changed"))
        nats.start()
        wait_until(lambda: bool(refusals()), 15, "the refusal said")
        attempts = bridge._failures.count
        wait_until(lambda: bridge._failures.count >= attempts + 4, 15, "four more attempts refused")
        assert len(refusals()) == 1, said
        assert not bridge.statistics().connected
    assert PASSWORD not in "".join(said) and "changed" not in "".join(said) and "Traceback" not in "".join(said)


# --- an unreachable server --------------------------------------------------------------------


def test_an_unreachable_server_is_waited_for_then_bridged(make_server: Callable[..., NatsServer], hosts: list[str]) -> None:  # noqa: F811
    a, b = hosts[:2]
    nats = make_server()
    nats.port = free_port()  # nothing listens there yet
    process = BridgeProcess(nats.url, b, ["prices"], ready=False)
    local = Subscriber("prices")
    with in_namespace(b):
        remote = Subscriber("prices")
    try:
        line = _wait_for_failure_line(process)
        assert f"nats://127.0.0.1:{nats.port}" in line and "connection refused" in line, line
        assert "retrying" in line
        nats.start()
        ready = process.stdout_line(15)  # the backoff is 5 s at most
        assert ready.startswith("ready"), ready
        with shmfeed.Bridge(nats.url, feeds=["prices"]):
            feed = shmfeed.Feed("prices")
            feed.send({"marker": "late"})
            assert remote.until({"late"}) == [{"marker": "late"}]
            feed.detach()
        assert process.terminate() == 0
        assert process.stdout.startswith("stopped: "), process.stdout
        assert "Traceback" not in process.stderr and process.stderr.count("\n") <= 1, process.stderr
    finally:
        process.end()
        local.close()
        remote.close()


# --- TLS --------------------------------------------------------------------------------------


def test_tls_with_the_servers_ca_carries_values(make_server: Callable[..., NatsServer], hosts: list[str], tmp_path: Path) -> None:  # noqa: F811
    files = tls_files(tmp_path / "tls")
    nats = make_server(files.server_config())
    url = nats.start()
    tls_url = url.replace("nats://", "tls://")  # a tls:// URL with just the CA works as well
    process, shown = _crosses(tls_url, hosts[1], ["--tls-ca", str(files.ca)], tls_ca=str(files.ca))
    assert shown == tls_url and process.stderr == ""


def test_tls_without_the_ca_fails_clearly_and_retries(make_server: Callable[..., NatsServer], hosts: list[str], tmp_path: Path) -> None:  # noqa: F811
    files = tls_files(tmp_path / "tls")
    nats = make_server(files.server_config())
    url = nats.start()
    process = BridgeProcess(url, hosts[1], ["prices"], ready=False)
    try:
        line = _wait_for_failure_line(process)
        assert "TLS: the server's certificate is not trusted" in line and "--tls-ca" in line, line
        _stopped_without_connecting(process)
    finally:
        process.end()


def test_mutual_tls_needs_the_client_certificate(make_server: Callable[..., NatsServer], hosts: list[str], tmp_path: Path) -> None:  # noqa: F811
    files = tls_files(tmp_path / "tls")
    nats = make_server(files.server_config(verify_clients=True))
    url = nats.start()
    client = ["--tls-ca", str(files.ca), "--tls-cert", str(files.client_cert), "--tls-key", str(files.client_key)]
    process, _ = _crosses(url, hosts[1], client, tls_ca=str(files.ca), tls_cert=str(files.client_cert),
                          tls_key=str(files.client_key))
    assert process.stderr == ""
    without = BridgeProcess(url, hosts[1], ["prices"], options=["--tls-ca", str(files.ca)], ready=False)
    try:
        line = _wait_for_failure_line(without)
        assert "TLS: the server wants a client certificate" in line and "--tls-cert and --tls-key" in line, line
        _stopped_without_connecting(without)
    finally:
        without.end()
    # The server's own certificate is not one for a client (its extended key usage).
    not_a_client = ["--tls-ca", str(files.ca), "--tls-cert", str(files.server_cert), "--tls-key", str(files.server_key)]
    wrong = BridgeProcess(url, hosts[1], ["prices"], options=not_a_client, ready=False)
    try:
        line = _wait_for_failure_line(wrong)
        assert f"TLS: the server refused the client certificate {files.server_cert}" in line, line
        _stopped_without_connecting(wrong)
    finally:
        wrong.end()


# --- a creds file (operator mode) -------------------------------------------------------------


def test_a_creds_file_carries_values_and_another_operators_is_refused(make_server: Callable[..., NatsServer], hosts: list[str],  # noqa: F811
                                                                      tmp_path: Path) -> None:
    pytest.importorskip("nkeys", reason="creds need nats-py's nkeys extra")
    config, creds = operator_creds(tmp_path / "operator")
    _, strangers = operator_creds(tmp_path / "another-operator")
    nats = make_server(config)
    url = nats.start()
    seed = creds.read_text().split("-----BEGIN USER NKEY SEED-----")[1].split()[0]
    process, _ = _crosses(url, hosts[1], ["--creds", str(creds)], creds=str(creds))
    assert seed not in process.stdout + process.stderr + process.ready_line
    refused = BridgeProcess(url, hosts[1], ["prices"], options=["--creds", str(strangers)], ready=False)
    try:
        line = _wait_for_failure_line(refused)
        assert "NATS refused the credentials" in line, line
        _stopped_without_connecting(refused)
    finally:
        refused.end()


# --- options refused before connecting --------------------------------------------------------


def _refused(options: list[str], tmp_path: Path) -> str:
    """``shmfeed bridge`` with ``options``: exit 2 at once, one clear line; its text."""
    import os
    import sys

    from _nats import REPO

    done = subprocess.run([sys.executable, "-m", "shmfeed._cli", "bridge", f"nats://127.0.0.1:{free_port()}",
                           *options], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stdout == "" and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmfeed bridge: ") and "; " in lines[0], lines
    return lines[0]


def test_bad_connection_options_are_refused_with_status_2(tmp_path: Path) -> None:
    secret = "SUAM3ZZTOPSECRETSEEDTHATMUSTNEVERBEPRINTED"
    not_creds = tmp_path / "not.creds"
    not_creds.write_text(f"-----BEGIN USER NKEY SEED-----\n{secret}\n------END USER NKEY SEED------\n")
    line = _refused(["--creds", str(not_creds)], tmp_path)
    assert "is not a NATS creds file" in line and "user JWT" in line and secret not in line, line
    assert "does not exist" in _refused(["--creds", str(tmp_path / "missing.creds")], tmp_path)
    assert "does not exist" in _refused(["--tls-ca", str(tmp_path / "missing.pem")], tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert "holds no usable certificate" in _refused(["--tls-ca", str(garbage)], tmp_path)
    files = tls_files(tmp_path / "tls")
    assert "--tls-cert was given without --tls-key" in _refused(["--tls-cert", str(files.client_cert)], tmp_path)
    assert "--tls-key was given without --tls-cert" in _refused(["--tls-key", str(files.client_key)], tmp_path)
    mismatch = _refused(["--tls-cert", str(files.client_cert), "--tls-key", str(files.server_key)], tmp_path)
    assert "do not load together" in mismatch
    # The same from Python: a ValueError when the Bridge is made.
    with pytest.raises(ValueError, match="is not a NATS creds file"):
        shmfeed.Bridge("nats://127.0.0.1:1", creds=str(not_creds))


# --- secrets in URLs and messages -------------------------------------------------------------


@pytest.mark.parametrize(("url", "shown"), [
    ("nats://a:s3cret@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
    ("nats://t0ken@host:4222", "nats://***@host:4222"),
    ("tls://a:p%40ss@host:4222?token=abc&x=1", "tls://***@host:4222?***"),
    ("a:s3cret@host:4222", "***@host:4222"),
    ("nats://a:s3cret@h1:4222,nats://b:other@h2:4222", "nats://***@h1:4222,nats://***@h2:4222"),
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
])
def test_urls_are_shown_without_their_secrets(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_a_failure_is_described_without_the_secrets_its_text_holds() -> None:
    url = "nats://alice:s3cret@127.0.0.1:4222?token=t0psecret"
    error = OSError("nats: could not use alice:s3cret with token=t0psecret")
    sentence = _bridge_connect.describe_failure(error, url, ConnectOptions())
    assert "s3cret" not in sentence and "t0psecret" not in sentence and "; " in sentence, sentence
    assert _bridge_connect.classify(OSError(111, "Connect call failed")) is _bridge_connect.FailureKind.UNREACHABLE
    assert "connection refused" in _bridge_connect.describe_failure(OSError(111, "Connect call failed"), url)
