"""Cluster mode: Codis's model (1024 slots over server groups) on stock servers.

``slots`` is the key -> slot rule, ``model`` the topology document the
dashboard writes and the proxies follow; both are pure (no Twisted).
"""
