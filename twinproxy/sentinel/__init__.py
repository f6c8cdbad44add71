"""Following Redis Sentinel: parsing sentinel and data-node replies and events
(``replies``), the pure decisions that turn a set of sentinel answers into one
master and a replica into a usable read target (``decide``), and a blocking
probe of a pool's sentinels for the command line, start-up and reload
(``check``).
"""
