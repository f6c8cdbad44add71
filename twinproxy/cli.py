"""The ``twinproxy`` command: check a config, print the version, or run.

``twinproxy -t [-c] FILE`` checks a pool file and exits 0 or 1 like
``nutcracker -t``; ``twinproxy -c FILE`` runs the proxy in the foreground
through twistd.  This module never imports the reactor itself.
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import List, Optional

from twinproxy import __version__
from twinproxy.config import ConfigError, load_file

DEFAULT_CONFIG = "conf/pools.yml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twinproxy",
        description="memcached and Redis sharding proxy; reads nutcracker pool files unchanged")
    parser.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    parser.add_argument("-t", "--test-conf", action="store_true",
                        help="check the configuration file for syntax errors and exit")
    parser.add_argument("-c", "--conf-file", "--config", dest="config", metavar="FILE",
                        help=f"pool file (default: {DEFAULT_CONFIG})")
    parser.add_argument("file", nargs="?", help=argparse.SUPPRESS)
    return parser


def check_config(path: str, out=None, err=None) -> int:
    """Validate ``path``; print the nutcracker-style verdict; return the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        pools = load_file(path)
    except ConfigError as error:
        print(f"twinproxy: configuration file '{path}' syntax is invalid", file=err)
        print(f"twinproxy: {error}", file=err)
        return 1
    print(f"twinproxy: configuration file '{path}' syntax is ok ({len(pools)} pools)", file=out)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        print(f"twinproxy {__version__}")
        return 0
    path = args.config or args.file or DEFAULT_CONFIG
    if args.test_conf:
        return check_config(path)
    if check_config(path, out=io.StringIO()) != 0:
        return 1
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "twinproxy", "--config", path]
    run()
    return 0
