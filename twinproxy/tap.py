"""``twistd twinproxy``: command-line options and the service they make.

Owns the twistd options and ``makeService``, which only wires: the config
is loaded and checked in ``postOptions`` so a bad file fails before twistd
daemonizes, and the reactor is imported here and nowhere else.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from twinproxy import __version__
from twinproxy.config import ConfigError, load_file


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("A memcached and Redis sharding proxy that reads nutcracker (twemproxy) pool files "
                "unchanged. Starts one service per pool in the file.")

    optParameters = [
        ["config", "c", "conf/pools.yml", "nutcracker-style YAML pool file"],
    ]

    def opt_conf_file(self, path: str) -> None:
        """Same as --config (nutcracker's name for it)."""
        self["config"] = path

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"twinproxy {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self.pools = load_file(self["config"])
        except ConfigError as err:
            raise usage.UsageError(str(err)) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from twinproxy.service import make_service

    return make_service(options.pools, reactor)

