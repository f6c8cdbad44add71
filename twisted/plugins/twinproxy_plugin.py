"""twistd plugin drop-in: ``twistd twinproxy --config conf/pools.yml``.

Kept to one line of substance so ``twistd --help`` stays fast: the options
and the service are imported from ``twinproxy.tap`` only when used.
"""

from twisted.application.service import ServiceMaker

twinproxy = ServiceMaker(
    "twinproxy",
    "twinproxy.tap",
    "memcached and Redis sharding proxy (nutcracker-compatible pool files)",
    "twinproxy",
)
