"""Key placement equals nutcracker 0.5.0's, for every golden table in tests/data/placement."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from twinproxy.config import load_file
from twinproxy.pool import ServerPool

TABLES = sorted((Path(__file__).resolve().parent.parent / "data" / "placement").glob("*.yml"))


def test_every_table_is_present():
    """All of the reference tables were copied (12 hashes, weights, names, tags, modula, memcached)."""
    assert len(TABLES) == 21
    hashes = {load_file(str(table))[0].hash for table in TABLES}
    assert len(hashes) == 12


@pytest.mark.parametrize("table", TABLES, ids=[t.stem for t in TABLES])
def test_placement_matches_nutcracker(table):
    """Every key of the table lands on the server nutcracker put it on."""
    (config,) = load_file(str(table))
    pool = ServerPool(config, Clock())
    with open(table.with_suffix(".csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 300
    wrong = [row["key"] for row in rows
             if pool.server_for_key(row["key"].encode()).index != int(row["server_index"])]
    assert wrong == []
