"""The ``shmfeed`` command: ``gc`` (and, in later releases, ``monitor`` and ``registry``)."""

from __future__ import annotations

import argparse
import sys

from . import _gc, _names


def _gc_command(args: argparse.Namespace) -> int:
    namespace = args.namespace or _names.current_namespace()
    found = _gc.sweep(namespace, remove=not args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in found.all():
        print(f"{verb} {path}")
    print(f"shmfeed gc: namespace {namespace!r}: {verb} {len(found.all())} leftover(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shmfeed", description="Event feeds across processes.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    gc_parser = commands.add_parser("gc", help="remove what dead processes of a namespace left behind")
    gc_parser.add_argument("--namespace", help="namespace (default: $SHMFEED_NAMESPACE or one per user)")
    gc_parser.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc_parser.set_defaults(run=_gc_command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
