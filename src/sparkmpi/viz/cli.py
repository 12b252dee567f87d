"""``spark-mpi view FILE`` and ``spark-mpi view --follow DIR|kafka://HOST:PORT/TOPIC``."""

from __future__ import annotations

import argparse
import contextlib


def cmd_view(args: argparse.Namespace) -> int:
    from sparkmpi.viz.app import serve

    if args.file is None and args.follow is None:
        raise ValueError("give a file to show, or --follow DIR|kafka://HOST:PORT/TOPIC")
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.file, port=args.port, host=args.host, follow=args.follow)
    return 0


def add_commands(sub) -> None:
    """Registers ``view`` on the ``spark-mpi`` parser."""
    view = sub.add_parser("view", help="show a volume or result in the web browser")
    view.add_argument("file", nargs="?", help=".h5/.vti/.npy/.tif volume or a ptycho result .h5")
    view.add_argument(
        "--follow", help="a streaming run's --out directory or kafka://HOST:PORT/TOPIC"
    )
    view.add_argument("--port", type=int, default=8080)
    view.add_argument("--host", default="127.0.0.1")
    view.set_defaults(func=cmd_view, view="view")
