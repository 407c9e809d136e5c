"""The ``shmfeed`` command: ``monitor``, ``registry``, ``gc`` and ``bridge``."""

from __future__ import annotations

import argparse
import sys

from . import _bridge_connect, _names, _recovery
from ._errors import ShmfeedError


def _gc_command(args: argparse.Namespace) -> int:
    namespace = args.namespace or _names.current_namespace()
    if args.dry_run:
        from . import _gc

        found = _gc.sweep(namespace, remove=False).all()
        for path in found:
            print(f"would remove {path}")
        print(f"shmfeed gc: namespace {namespace!r}: would remove {len(found)} leftover(s)")
        return 0
    repairs = _recovery.recover_namespace(namespace)
    for line in repairs.released_locks:
        print(f"released {line}")
    if repairs.ended_subscriptions or repairs.failed_subscriptions:
        print(f"ended {repairs.ended_subscriptions} subscription(s) of dead processes, "
              f"failed {repairs.failed_subscriptions} whose senders all died")
    removed = repairs.destroyed + repairs.removed_files
    for path in removed:
        print(f"removed {path}")
    print(f"shmfeed gc: namespace {namespace!r}: removed {len(removed)} leftover(s)")
    return 0


def _registry_command(args: argparse.Namespace) -> int:
    from . import _registry

    forwarded = ["--forever"] if args.forever else []
    if args.namespace:
        forwarded += ["--namespace", args.namespace]
    if args.idle is not None:
        forwarded += ["--idle", str(args.idle)]
    return _registry.main(forwarded)


def _monitor_command(args: argparse.Namespace) -> int:
    from . import _monitor

    if args.interval <= 0:
        raise SystemExit("shmfeed: monitor --interval must be positive; give seconds above 0, such as 1")
    return _monitor.run(args.namespace or _names.current_namespace(), args.once, args.json, args.interval)


def _bridge_command(args: argparse.Namespace) -> int:
    import json
    import signal
    import threading

    from . import _bridge

    feeds = args.feed or []
    options = _bridge_connect.connect_options_of(args)
    try:
        options.validate()
    except ValueError as error:
        print(f"shmfeed bridge: {str(error).removeprefix('shmfeed: ')}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def make_bridge() -> _bridge.Bridge:  # one per attempt: a Bridge starts once
        return _bridge.Bridge(args.url, feeds, realm=args.realm, namespace=args.namespace, durable=args.durable,
                              max_age=args.max_age, max_bytes=args.max_bytes, max_pending=args.max_pending,
                              creds=options.creds, tls_ca=options.tls_ca, tls_cert=options.tls_cert,
                              tls_key=options.tls_key)

    try:
        make_bridge()  # bad arguments are said now, not after NATS answers
        started = _bridge_connect.start_with_retry(make_bridge, args.url, options, stop)
    except (ImportError, ValueError, RuntimeError, ShmfeedError) as error:
        print(f"shmfeed bridge: {str(error).removeprefix('shmfeed: ')}", file=sys.stderr)
        return 1
    if started is None:
        return 0  # stopped before NATS took us (said on stderr)
    bridge = started
    try:
        print(f"ready: namespace {_names.current_namespace()!r} bridged to {_bridge_connect.redacted(args.url)} "
              f"realm {args.realm!r} ({'durable' if args.durable else 'core'}): "
              f"feeds {', '.join(feeds) or 'every named feed'}", flush=True)
        while not stop.wait(3600):
            pass
    finally:
        bridge.close()
    statistics = bridge.statistics()
    summary: dict[str, dict[str, object]] = {
        feed.name: {"out": feed.out, "in": feed.in_, "dropped": dict(feed.dropped)} for feed in statistics.feeds}
    if args.durable:
        for feed in statistics.feeds:
            summary[feed.name]["redelivered"] = feed.redelivered
    print(f"stopped: {json.dumps(summary, sort_keys=True)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shmfeed", description="Event feeds across processes.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    monitor = commands.add_parser("monitor", help="watch a namespace live: feeds, channels, scopes, who blocks whom")
    monitor.add_argument("--namespace", help="namespace (default: $SHMFEED_NAMESPACE or one per user)")
    monitor.add_argument("--once", action="store_true", help="print one view and exit")
    monitor.add_argument("--json", action="store_true", help="print one machine-readable snapshot and exit")
    monitor.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    monitor.set_defaults(run=_monitor_command)
    registry = commands.add_parser("registry", help="run the namespace's registry in the foreground")
    registry.add_argument("--namespace", help="namespace (default: $SHMFEED_NAMESPACE or one per user)")
    registry.add_argument("--idle", type=float, help="exit after this many seconds with nothing in the namespace")
    registry.add_argument("--forever", action="store_true", help="never exit because idle")
    registry.set_defaults(run=_registry_command)
    gc = commands.add_parser("gc", help="remove what dead processes of a namespace left behind")
    gc.add_argument("--namespace", help="namespace (default: $SHMFEED_NAMESPACE or one per user)")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.set_defaults(run=_gc_command)
    bridge = commands.add_parser("bridge", help="join this namespace's feeds with other namespaces' through NATS")
    bridge.add_argument("url", help="the NATS server, e.g. nats://127.0.0.1:4222")
    bridge.add_argument("--namespace", help="namespace (default: $SHMFEED_NAMESPACE or one per user)")
    bridge.add_argument("--feed", action="append", metavar="NAME", help="a feed to bridge (repeat for more); ending in * (quote it): every feed with that prefix, opened "
                             "now or later; none: every named feed of the namespace")
    bridge.add_argument("--realm", default="default", help="separates applications sharing one NATS (default: default)")
    bridge.add_argument("--durable", action="store_true",
                        help="through JetStream: nothing lost or twice across restarts of NATS or the bridge")
    bridge.add_argument("--max-age", type=float, metavar="SECONDS", help="durable: the stream keeps values this long")
    bridge.add_argument("--max-bytes", type=int, metavar="BYTES", help="durable: the stream keeps this many bytes")
    bridge.add_argument("--max-pending", type=int, default=65536, metavar="N",
                        help="durable: values held per feed while NATS is away before the bridge's outbox drops (65536)")
    _bridge_connect.add_connection_arguments(bridge)
    bridge.set_defaults(run=_bridge_command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
