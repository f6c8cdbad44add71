"""twinproxy: a memcached and Redis sharding proxy, drop-in for nutcracker."""

__version__ = "0.1.0"
