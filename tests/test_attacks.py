"""Another local user gets nothing, wedges nothing and runs nothing as us (SPEC §3).

Each attack is run by a real second user (``nobody``, see ``_attacker``) while this test's
process, the victim, keeps working. The attacker knows the victim's namespace and feed
names, and sees every name in /dev/shm.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

import psutil
import pytest

import shmfeed
from shmfeed import _names, _registry_client, _shm

import _attacker as A
import _kill_workers as K

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(A.skip_reason() is not None, reason=str(A.skip_reason()))]


@pytest.fixture(scope="module")
def library():
    directory = A.make_library_copy()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def attacker(library, other_user_turn):
    user = A.OtherUser(library)
    yield user
    user.stop()
    _end_processes_of(A.NOBODY)
    A.remove_files_of(A.NOBODY, start="sf.")
    A.remove_files_of(A.NOBODY, start="sem.sf.")
    shutil.rmtree(f"/tmp/shmfeed-{A.NOBODY}", ignore_errors=True)


def _end_processes_of(uid: int) -> None:
    """Kill what the other user left running (its registries) and wait for it to go."""
    mine = [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]
    for process in mine:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(mine, timeout=10)


@pytest.fixture
def shared_dir():
    """A world-writable directory, like /tmp or a shared project folder."""
    directory = tempfile.mkdtemp(prefix="shmfeed-shared-")
    os.chmod(directory, 0o1777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# --- 1. named feeds are not another user's to read or to block ---------------------------

_SUBSCRIBE_AND_LISTEN = """
import os, sys, shmfeed
feed = shmfeed.Feed("prices")
channel = shmfeed.Channel()
feed.subscribe(channel)
foreign = 0
for entry in os.listdir("/dev/shm"):
    path = "/dev/shm/" + entry
    try:
        os.chmod(path, 0o666)          # succeeds on its own files only
        with open(path, "rb") as f:
            f.read(1)
        foreign += os.lstat(path).st_uid != os.getuid()
    except OSError:
        pass
print("ready", foreign, flush=True)
sys.stdin.readline()
try:
    print("got", channel.recv(timeout=1.0), flush=True)
except TimeoutError:
    print("nothing", flush=True)
"""


@pytest.mark.parametrize("first", ["victim", "attacker"])
def test_another_user_with_our_namespace_receives_nothing(namespace, attacker, first):
    feed = shmfeed.Feed("prices")
    if first == "victim":
        mine = shmfeed.Channel()
        feed.subscribe(mine)
    spy = attacker.start(_SUBSCRIBE_AND_LISTEN, namespace=namespace)
    assert A.hear(spy) == "ready 0", "the other user opened a file of ours"
    if first == "attacker":
        mine = shmfeed.Channel()
        feed.subscribe(mine)
    assert feed.send({"card": "4111 1111 1111 1111"}) == 1
    assert mine.recv(timeout=5) == {"card": "4111 1111 1111 1111"}
    A.say(spy, "go")
    assert A.hear(spy) == "nothing"


_PLANT_GUESSES = """
import hashlib, os, sys
namespace, seen, names = sys.argv[1], sys.argv[2], sys.argv[3:]
def sha(text, n):
    return hashlib.sha1(text.encode()).hexdigest()[:n]
prefixes = {"sf.%s." % sha(namespace, 8), seen}  # the old format, and the prefix seen in /dev/shm
planted = 0
for start in prefixes:
    for name in names:
        for path in ("/dev/shm/%sfn%s" % (start, sha(name, 20)), "/dev/shm/%ss%s" % (start, sha(name, 20))):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                os.ftruncate(fd, 1 << 16)
                os.close(fd)
                planted += 1
            except OSError:
                pass
print(planted, flush=True)
"""


def test_files_planted_at_guessable_names_stop_nothing(namespace, attacker):
    before = shmfeed.Channel()  # the victim's names are visible in /dev/shm
    planted = int(attacker.run(_PLANT_GUESSES, namespace, _names.prefix(namespace), "orders", "audit",
                                   namespace=namespace))
    assert planted > 0, "premise: the attacker planted files"
    feed = shmfeed.Feed("orders")
    feed.subscribe(before)
    scope = shmfeed.SubscriptionScope("audit")
    scope.track(feed.subscribe(mine := shmfeed.Channel()))
    assert feed.send("order 1") == 2
    assert before.recv(timeout=5) == "order 1" and mine.recv(timeout=5) == "order 1"
    scope.close()


def test_a_file_planted_at_our_exact_name_is_passed_over(namespace, attacker):
    # Names are keyed with the user's secret, but a name in use is visible: once that feed
    # is gone, another user may plant a file there before it is made again.
    path = _names.shm_path(_names.feed_segment(namespace, _names.named_feed_key(namespace, "leaked")))
    attacker.run("import os, sys; fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o666); "
                 "os.ftruncate(fd, 1 << 16); os.fchmod(fd, 0o666)", path)
    with pytest.raises(shmfeed.ShmfeedError, match="not yours"):
        _shm.open_segment(path.removeprefix(_names.SHM_DIR))  # what is there is never used
    feed, channel = shmfeed.Feed("leaked"), shmfeed.Channel()
    feed.subscribe(channel)
    assert feed.send({"card": 1}) == 1 and channel.recv(timeout=5) == {"card": 1}
    assert _names.shm_path(feed._core.segment_name) != path  # it took its next name
    feed.close()


# --- 2. the registry imports nothing from the working directory --------------------------

_PLANTED_MODULE = "import os\nopen(os.path.join(os.path.dirname(__file__), 'ran-' + __name__), 'w').close()\n"


def test_the_registry_imports_nothing_from_a_shared_working_directory(namespace, attacker, shared_dir, tmp_path):
    for module in ("psutil", "msgpack", "posix_ipc", "shmfeed"):
        attacker.run("import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                     os.path.join(shared_dir, module + ".py"), _PLANTED_MODULE)
    program = tmp_path / "victim.py"
    program.write_text(textwrap.dedent("""
        import shmfeed
        feed, channel = shmfeed.Feed("ticks"), shmfeed.Channel()
        feed.subscribe(channel)
        feed.send(1)
        assert channel.recv(timeout=5) == 1
        print("sent", flush=True)
    """))
    result = subprocess.run([sys.executable, str(program)], cwd=shared_dir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    pid = K.registry_pid(namespace)
    assert psutil.Process(pid).cwd() == "/"
    assert not [entry for entry in os.listdir(shared_dir) if entry.startswith("ran-")]


# --- 3. decoding never imports --------------------------------------------------------

_RECEIVER = """
import os, shmfeed
feed, channel = shmfeed.Feed("orders"), shmfeed.Channel()
feed.subscribe(channel)
print("ready", flush=True)
try:
    print("got", channel.recv(timeout=30), flush=True)
except shmfeed.ShmfeedError as error:
    print(type(error).__name__, error, flush=True)
"""


@dataclass
class Order:
    qty: int


def test_a_value_naming_a_planted_module_does_not_run_it(namespace, attacker, shared_dir, monkeypatch):
    attacker.run("import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                 os.path.join(shared_dir, "evilmod.py"), _PLANTED_MODULE)
    # The sender's own evilmod.Order, in a module of its own: the name is all that travels.
    monkeypatch.setattr(Order, "__module__", "evilmod")
    monkeypatch.setitem(sys.modules, "evilmod", sys.modules[__name__])
    receiver = subprocess.Popen([sys.executable, "-c", _RECEIVER], cwd=shared_dir, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # "-c": the directory is on its sys.path
    try:
        assert A.hear(receiver) == "ready"
        assert shmfeed.Feed("orders").send(Order(3)) == 1
        answer = A.hear(receiver)
    finally:
        receiver.communicate(timeout=30)
    assert "'evilmod.Order'" in answer and "import its module" in answer, answer
    assert not os.path.exists(os.path.join(shared_dir, "ran-evilmod"))


# --- 4. planted names wedge and crash nothing --------------------------------------------

_PLANT_TRAPS = """
import os, sys
start, channel_id = sys.argv[1], sys.argv[2]
hex16, hex20 = "0123456789abcdef", "0123456789abcdef0123"
fifos = [start + "c" + hex16, start + "fn" + hex20, start + "s" + hex20, "sem." + start + "l" + hex16,
         "sem." + start + "w" + hex16, start + "c" + channel_id + ".x" + hex16]
for name in fifos:
    os.mkfifo("/dev/shm/" + name, 0o666)
for name in (start + "t0.0", "sem." + start + "wnothex", start + "cffffffffffffffff.t1"):
    open("/dev/shm/" + name, "w").close()
os.symlink("/etc/passwd", "/dev/shm/" + start + "cfedcba9876543210")
print("planted", flush=True)
"""


def test_planted_fifos_symlinks_and_odd_names_wedge_nothing(namespace, attacker):
    channel = shmfeed.Channel(capacity=4)
    registry = K.registry_pid(namespace)
    attacker.run(_PLANT_TRAPS, _names.prefix(namespace), f"{channel._channel_id:016x}")
    for command in (["gc"], ["gc", "--dry-run"], ["monitor", "--once"], ["monitor", "--json"]):
        result = subprocess.run([sys.executable, "-m", "shmfeed._cli", *command, "--namespace", namespace],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, (command, result.stderr)
    assert _registry_client.request(namespace, {"op": "recover"}, timeout=10)["ok"]
    assert K.registry_pid(namespace) == registry, "the registry died"
    channel.send("still here", timeout=5)
    assert channel.recv(timeout=5) == "still here"


# --- 4. a squatted runtime directory (a planted spill link: test_untrusted.py, as nobody) is no denial of service -----------------------------

_VICTIM_PROGRAM = """
import shmfeed
from shmfeed import _registry_client
feed, channel = shmfeed.Feed("prices"), shmfeed.Channel()
feed.subscribe(channel)
assert feed.send(42) == 1 and channel.recv(timeout=5) == 42
print(_registry_client.runtime_dir(), flush=True)
"""


def test_a_squatted_runtime_directory_is_not_a_denial_of_service(namespace, attacker, library):
    home = tempfile.mkdtemp(prefix="shmfeed-victim-home-")
    os.chown(home, A.VICTIM, A.VICTIM)
    squatted = f"/tmp/shmfeed-{A.VICTIM}"
    victim = A.OtherUser(library, uid=A.VICTIM, home=home)
    try:
        attacker.run("import os, sys; os.mkdir(sys.argv[1], 0o700)", squatted)
        where = victim.run(_VICTIM_PROGRAM, namespace=namespace).strip()
        assert where.startswith(home + "/"), where
    finally:
        victim.stop()
        _end_processes_of(A.VICTIM)
        A.remove_files_of(A.VICTIM, start="sf.")
        A.remove_files_of(A.VICTIM, start="sem.sf.")
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(squatted, ignore_errors=True)
