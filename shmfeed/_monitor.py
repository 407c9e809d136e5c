"""``shmfeed monitor``: a live view of a namespace, like ``top``.

The figures come from ``_inspect.snapshot`` (read-only mappings, no locks), so watching
costs the bus nothing; rates are the differences between two snapshots. The registry is
asked only for its pid and start time. Bridges (their counters live in their own processes)
are read from the status files each one writes (``_bridge_status``).

Every string the view shows came from shared memory or another process (feed, scope and
type names, process names from /proc, file names): any of them may hold terminal escapes or
rich markup, so each is shown through ``untrusted_text``, literally and with control
characters escaped. ``--json`` prints the view raw (JSON escapes control characters).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any

from . import _bridge_status, _inspect, _registry_client

if TYPE_CHECKING:
    from rich.text import Text

# 2: channels have holders, last_receiver, no_reader_s, never_read.
# 3: channels have name (their label) and readers[] ({pid, name, alive, seconds_ago}).
# 4: bridges[]: each bridge's status file (_bridge_status.read_all), with alive and age_s.
SCHEMA_VERSION = 4
LEFTOVERS_SHOWN = 10  # leftovers listed by name; the rest are counted
BRIDGE_STALL_SECONDS = 5.0  # a live bridge whose status is older than this is shown as not updating
DROP_REASONS_SHOWN = 2  # a bridge's drop reasons named on screen, most first
OWNER_WIDTH = 24  # the channel table's owner column: pid and process name, cut to fit
LABEL_WIDTH = 20  # a channel's label on screen (then its id)
# C0, DEL, C1, and the invisible marks that reorder or hide text (bidi overrides, isolates,
# zero-width characters): a name must not be shown as something it is not.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def collect(namespace: str, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """One machine-readable view: the snapshot, the registry, and rates against ``previous``."""
    view = _inspect.snapshot(namespace)
    view["schema"] = SCHEMA_VERSION
    view["bridges"] = _bridge_status.read_all(namespace)
    answer = _registry_client.ping(namespace, timeout=1.0)
    try:
        view["registry"] = None if answer is None else {
            "pid": int(answer["pid"]), "uptime_s": round(time.time() - float(answer["started"]), 1)}
    except (KeyError, TypeError, ValueError):  # an answer of another shape: shown as none
        view["registry"] = None
    elapsed = (view["time"] - previous["time"]) if previous else 0.0
    before_feeds = {f["key"]: f for f in previous["feeds"]} if previous else {}
    before_channels = {c["id"]: c for c in previous["channels"]} if previous else {}
    for feed in view["feeds"]:
        before = before_feeds.get(feed["key"])
        feed["rate_per_s"] = _rate(feed["sent"], before and before["sent"], elapsed)
    for channel in view["channels"]:
        before = before_channels.get(channel["id"])
        channel["rate_per_s"] = _rate(channel["sent"], before and before["sent"], elapsed)
        channel["bytes_per_s"] = _rate(channel["bytes_written"], before and before["bytes_written"], elapsed)
    view["feeds"].sort(key=lambda f: (-(f["rate_per_s"] or 0), -f["sent"]))
    view["channels"].sort(key=lambda c: (-bool(c["waiting_senders"]), -c["fill"] / c["capacity"], -(c["rate_per_s"] or 0)))
    view["totals"] = {
        "feeds": len(view["feeds"]),
        "channels": len(view["channels"]),
        "scopes": len(view["scopes"]),
        "processes": len({p["pid"] for c in view["channels"] for p in c["processes"]}
                         | {p["pid"] for f in view["feeds"] for p in f["processes"]}),
        "blocked_senders": sum(len(c["waiting_senders"]) for c in view["channels"]),
    }
    return view


def _rate(now: int, before: int | None, elapsed: float) -> float | None:
    if before is None or elapsed <= 0:
        return None
    return round(max(0, now - before) / elapsed, 1)


def exists(view: dict[str, Any]) -> bool:
    return bool(view["registry"] or view["feeds"] or view["channels"] or view["scopes"] or view["leftovers"]
                or view.get("bridges"))


# --- rendering ---------------------------------------------------------------------------------


def untrusted_text(value: object, style: str = "") -> Text:
    """``value`` as text to show that cannot act on the terminal or on rich.

    Control characters (C0, DEL, C1: ESC, BEL, CSI, ...) become ``\\x..`` escapes, and the
    result is a ``Text``, which rich never parses for markup, so ``[red]`` or ``[link=...]``
    in a name is shown as written.
    """
    from rich.text import Text

    escaped = CONTROL_CHARACTERS.sub(_escape, str(value))
    return Text(escaped, style=style)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _bar(fill: int, capacity: int, width: int = 12) -> str:
    filled = round(width * fill / capacity) if capacity else 0
    return "█" * filled + "·" * (width - filled)


def _fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}"


def _fmt_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    return "-"


def _readers(channel: dict[str, Any], limit: int = 2) -> str:
    """The processes that read the channel and when each last did, latest first:
    "4711 waiting, 4712 3s", "no reader 35s (last 4711)" once every reader is gone, "never"."""
    waiting = set(channel["waiting_receivers"])
    live = [reader for reader in channel["readers"] if reader["alive"]]
    shown = [f"{reader['pid']} " + ("waiting" if reader["pid"] in waiting else f"{reader['seconds_ago']:.0f}s")
             for reader in live[:limit]]
    shown += [f"{pid} waiting" for pid in sorted(waiting - {reader["pid"] for reader in live})][: limit - len(shown)]
    if shown:
        more = len(live) + len(waiting - {reader["pid"] for reader in live}) - len(shown)
        return ", ".join(shown) + (f" +{more}" if more > 0 else "")
    last = channel["last_receiver"]
    if channel["no_reader_s"] is not None:
        return f"no reader {channel['no_reader_s']:.0f}s (last {last['pid']})" if last else "no reader"
    if last is None:
        return "never"
    return f"{last['pid']} {last['seconds_ago']:.0f}s"


def _cut(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters as shown (control characters escaped), "…" last."""
    shown = CONTROL_CHARACTERS.sub(_escape, text)
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def _channel_label(channel: dict[str, Any]) -> str:
    """A channel as the screen names it: its label (cut to fit) and its id's first digits."""
    name = channel.get("name")
    if not name:
        return str(channel["id"][:8])
    return f"{_cut(name, LABEL_WIDTH)} {channel['id'][:8]}"  # cut as shown: an escape is 4 characters wide


def _processes(processes: list[dict[str, Any]], limit: int = 3) -> str:
    shown = [f"{p['pid']}" + ("" if p["alive"] else "†") for p in processes[:limit]]
    return ",".join(shown) + ("…" if len(processes) > limit else "")


def render(view: dict[str, Any], width: int = 120) -> Any:
    """A rich renderable of the view, for a terminal ``width`` columns wide."""
    from rich.cells import cell_len
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    registry = view["registry"]
    header = Text.assemble(("shmfeed monitor  namespace ", "bold"), untrusted_text(repr(view["namespace"]), "bold"), "  ")
    header.append_text(untrusted_text(f"registry pid {registry['pid']} up {registry['uptime_s']:.0f}s", "green")
                       if registry else Text("registry: not running", style="yellow"))
    totals = view["totals"]
    header.append(f"\n{totals['feeds']} feeds  {totals['channels']} channels  {totals['scopes']} scopes  "
                  f"{totals['processes']} processes  {totals['blocked_senders']} blocked senders")

    feeds = Table(title="Feeds", expand=True, title_justify="left")
    for column in ("name", "type", "senders", "subs", "sent", "rate/s"):
        feeds.add_column(column, justify="right" if column in ("subs", "sent", "rate/s") else "left")
    for feed in view["feeds"]:
        feeds.add_row(*map(untrusted_text, (
            feed["name"] or f"<anon {feed['key'][:8]}>", (feed["elem_type"] or "-").removeprefix("builtins."),
            _processes(feed["senders"]), len(feed["subscriptions"]), f"{feed['sent']:,}",
            _fmt_rate(feed["rate_per_s"]),
        )))

    channels = Table(title="Channels (fullest first; red: a sender waits on it)", expand=True, title_justify="left")
    # The label, id and pids stay whole, on one line: the owner column gets what the others
    # leave (rich, left to it, would squeeze every column, pids included).
    headers = ("channel", "owner", "fill", "", "bytes", "rate/s", "blocked", "receivers")
    rows = [[
        _channel_label(channel), f"{channel['owner_pid']} {channel['owner_name']}",
        f"{channel['fill']:,}/{channel['capacity']:,}", _bar(channel["fill"], channel["capacity"], 8),
        _fmt_bytes(channel["bytes_in_ring"]), _fmt_rate(channel["rate_per_s"]),
        ", ".join(map(str, channel["waiting_senders"])) or "-", _readers(channel),
    ] for channel in view["channels"]]
    natural = [max([cell_len(header)] + [cell_len(CONTROL_CHARACTERS.sub(_escape, row[i])) for row in rows])
               for i, header in enumerate(headers)]
    others = sum(natural) - natural[1] + 3 * len(headers) + 1  # each column's padding and border
    owner_width = max(min(OWNER_WIDTH, width - others), len("owner"))
    for column in headers:
        channels.add_column(column, justify="right" if column in ("fill", "bytes", "rate/s") else "left",
                            no_wrap=True, overflow="ellipsis")
    for channel, row in zip(view["channels"], rows):
        style = "bold red" if channel["waiting_senders"] else ("dim" if channel["closed"] else None)
        row[1] = _cut(row[1], owner_width)
        channels.add_row(*map(untrusted_text, row), style=style)

    scopes = Table(title="Scopes", expand=True, title_justify="left")
    scopes.add_column("name")
    scopes.add_column("count", justify="right")
    scopes.add_column("state")
    for scope in view["scopes"]:
        scopes.add_row(*map(untrusted_text, (scope["name"], scope["count"], "closed" if scope["closed"] else "open")))

    problems = Text("Dead processes and leftovers\n", style="bold")
    if view["dead_processes"] or view["leftovers"]:
        if view["dead_processes"]:
            dead = untrusted_text(", ".join(map(str, view["dead_processes"])))
            # Only a running registry cleans up by itself; with none, say what will.
            who = ("the registry cleans up" if registry else
                   "no registry runs: `shmfeed gc` removes what they left")
            problems.append_text(Text.assemble("dead: ", dead, f" ({who})\n", style="red"))
        for path in view["leftovers"][:LEFTOVERS_SHOWN]:
            problems.append_text(Text.assemble("leftover: ", untrusted_text(path), " (shmfeed gc removes it)\n",
                                               style="yellow"))
        rest = len(view["leftovers"]) - LEFTOVERS_SHOWN
        if rest > 0:
            problems.append(f"… and {rest} more leftover(s) ({len(view['leftovers'])} in all; shmfeed gc removes "
                            f"them, shmfeed gc --dry-run lists them)\n", style="yellow")
    else:
        problems.append("none\n", style="green")
    footer = Text("q: quit", style="dim")
    parts: list[Any] = [header, feeds, channels, scopes]
    if view.get("bridges"):
        parts.append(_bridges_table(view["bridges"]))
    return Group(*parts, problems, footer)


def _bridge_state(bridge: dict[str, Any]) -> tuple[str, str]:
    """What a bridge is doing, as words and a style: dead, not updating, (dis)connected."""
    if not bridge["alive"]:
        return "dead", "red"
    if bridge["age_s"] > BRIDGE_STALL_SECONDS:
        return f"no update {bridge['age_s']:.0f}s", "yellow"
    reconnects = f" ({bridge['reconnects']} reconnects)" if bridge["reconnects"] else ""
    if bridge["connected"]:
        return "connected" + reconnects, "green"
    return "disconnected" + reconnects, "yellow"


def _dropped(feeds: list[dict[str, Any]]) -> str:
    """A bridge's dropped values: the total, and the reasons with most ("7: overflow 5, type 2")."""
    reasons: dict[str, int] = {}
    for feed in feeds:
        for reason, count in feed["dropped"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    total = sum(reasons.values())
    if not total:
        return "0"
    top = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))[:DROP_REASONS_SHOWN]
    more = " …" if len(reasons) > DROP_REASONS_SHOWN else ""
    return f"{total:,}: " + ", ".join(f"{reason} {count:,}" for reason, count in top) + more


def _bridges_table(bridges: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="Bridges", expand=True, title_justify="left")
    for column in ("pid", "realm", "server", "state", "mode", "feeds", "in", "out", "dropped", "lag"):
        # A long server or drop list folds onto more lines rather than losing its end (the port).
        table.add_column(column, justify="right" if column in ("pid", "feeds", "in", "out", "lag") else "left",
                         overflow="fold")
    for bridge in bridges:
        state, style = _bridge_state(bridge)
        feeds = bridge["feeds"]
        table.add_row(
            *map(untrusted_text, (bridge["pid"], bridge["realm"], bridge["server"])),
            untrusted_text(state, style),
            *map(untrusted_text, (
                bridge["mode"], bridge["feeds_total"], f"{sum(feed['in'] for feed in feeds):,}",
                f"{sum(feed['out'] for feed in feeds):,}", _dropped(feeds),
                "-" if bridge["lag"] is None else f"{bridge['lag']:,}",
            )),
            style="dim" if not bridge["alive"] else None,
        )
    return table


def render_text(view: dict[str, Any], width: int = 120) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=open(os.devnull, "w"), color_system=None)
    console.print(render(view, width))
    return console.export_text()


# --- the command ----------------------------------------------------------------------------------


def run(namespace: str, once: bool, as_json: bool, interval: float) -> int:
    first = collect(namespace)
    if not exists(first):
        print(f"shmfeed monitor: namespace {namespace!r} has no registry and nothing in /dev/shm "
              f"(is SHMFEED_NAMESPACE right?)", file=sys.stderr)
        return 1
    if once or as_json:
        time.sleep(min(interval, 0.5))  # a second sample, for the rates
        view = collect(namespace, first)
        if as_json:
            json.dump(view, sys.stdout, indent=2, default=str)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(render_text(view))
        return 0
    return _live(namespace, first, interval)


def _live(namespace: str, previous: dict[str, Any], interval: float) -> int:
    import termios
    import tty

    from rich.live import Live

    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        if saved is not None:
            tty.setcbreak(stdin)
        width = shutil.get_terminal_size().columns
        with Live(render(collect(namespace, previous), width), auto_refresh=False, screen=True) as live:
            while True:
                # Waiting for a key is also the refresh timer.
                ready, _, _ = select.select([stdin], [], [], interval)
                if ready and os.read(stdin, 1) in (b"q", b"Q", b"\x03"):
                    return 0
                view = collect(namespace, previous)
                previous = view
                live.update(render(view, live.console.width), refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
