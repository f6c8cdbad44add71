"""twistd plugin drop-in: ``twistd twinproxy-dashboard --coordinator URL --cluster NAME``.

Kept to one line of substance so ``twistd --help`` stays fast: the options
and the service are imported from ``twinproxy.dashboard.tap`` only when used.
"""

from twisted.application.service import ServiceMaker

twinproxy_dashboard = ServiceMaker(
    "twinproxy-dashboard",
    "twinproxy.dashboard.tap",
    "the dashboard of a twinproxy cluster (the topology's writer, with an HTTP JSON API)",
    "twinproxy-dashboard",
)
