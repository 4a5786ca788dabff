"""``watchbuy serve``: everything in one process on embedded defaults.

For now a media node; the site and the status agent join it as they land.
"""

from __future__ import annotations

import argparse

from watchbuy.engine.cli import add_node_options, run_media


def run_serve(args: argparse.Namespace) -> int:
    return run_media(args)


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="all-in-one: media node, site and status agent")
    add_node_options(serve)
    serve.set_defaults(run=run_serve)
