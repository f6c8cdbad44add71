"""Fixtures shared by the protocol tests."""

from __future__ import annotations

import pytest

from twinproxy.protocols import memcache_text, resp


@pytest.fixture(params=["c", "python"])
def scanners(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the C scanners (skipped when they are not built) and with pure Python alone."""
    if request.param == "c":
        if resp.speedups is None:
            pytest.skip("twinproxy._speedups is not built (or this is PyPy)")
    else:
        monkeypatch.setattr(resp, "speedups", None)
        monkeypatch.setattr(memcache_text, "speedups", None)
    return request.param
