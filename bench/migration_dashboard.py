"""``twinproxy-dashboard`` for the migration benchmark: the mover's constants set, optionally profiled.

    python bench/migration_dashboard.py [--batch N] [--scan-count N] [--profile PATH] -- DASHBOARD-ARGS...

Runs the dashboard's own command (``twinproxy.dashboard.cli.main``) in this
process after setting :mod:`twinproxy.dashboard.mover`'s ``BATCH`` and
``SCAN_COUNT`` (read when a sweep is made and at each SCAN), so the
benchmark can try them without editing the mover.  With ``--profile``,
SIGUSR1 starts cProfile and SIGUSR2 stops it and writes its stats to PATH
(the benchmark brackets the migration with them, so setup is not counted).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="keys per MIGRATE (mover.BATCH)")
    parser.add_argument("--scan-count", type=int, default=None, help="SCAN's COUNT (mover.SCAN_COUNT)")
    parser.add_argument("--profile", default=None, help="cProfile between SIGUSR1 and SIGUSR2, stats to PATH")
    options = parser.parse_args(argv[:split])

    from twinproxy.dashboard import mover

    if options.batch:
        mover.BATCH = options.batch
    if options.scan_count:
        mover.SCAN_COUNT = options.scan_count
    if options.profile:
        import cProfile

        profiler = cProfile.Profile()

        def start(signum: int, frame: Any) -> None:
            profiler.enable()

        def stop(signum: int, frame: Any) -> None:
            profiler.disable()
            profiler.dump_stats(options.profile)

        signal.signal(signal.SIGUSR1, start)
        signal.signal(signal.SIGUSR2, stop)

    from twinproxy.dashboard.cli import main as dashboard

    return dashboard(argv[split + 1:])


if __name__ == "__main__":
    raise SystemExit(main())
