"""The ``shmfeed`` command: ``monitor``, ``registry`` and ``gc``."""

from __future__ import annotations

import argparse
import sys

from . import _names, _recovery


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
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
