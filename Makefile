# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed

.PHONY: run run-sentinel cluster test lint deps venv clean bench bench-quick bench-migration pypy pypy-venv

run: deps venv
	scripts/run-demo.sh

# A second demo: a Sentinel pool over two shards and three sentinels; fail one over and watch.
run-sentinel: deps venv
	scripts/run-sentinel-demo.sh

# A small local cluster: file coordinator, dashboard, two groups, one proxy; drive it with twinproxy-admin.
cluster: deps venv
	scripts/run-cluster-demo.sh

test: deps venv
	$(VENV)/bin/ruff check twinproxy twisted tests bench
	$(VENV)/bin/python -m pytest

lint: venv
	$(VENV)/bin/ruff check twinproxy twisted tests bench

# The side-by-side benchmark (bench/run.py): nutcracker and PyPy are used when present;
# then the migration benchmark (bench/migration.py).
bench: deps venv pypy-venv
	$(VENV)/bin/python bench/run.py
	$(VENV)/bin/python bench/migration.py

bench-quick: deps venv pypy-venv
	$(VENV)/bin/python bench/run.py --quick
	$(VENV)/bin/python bench/migration.py --quick

# Online slot migration alone: 1M keys of 100 B, 2 -> 3 groups, under a client load through the proxy.
bench-migration: deps venv
	$(VENV)/bin/python bench/migration.py

# twinproxy and its whole test suite on PyPy 3.9 (Debian's pypy3), in .venv-pypy.
pypy: deps pypy-venv
	.venv-pypy/bin/python -m pytest

pypy-venv: .venv-pypy/.installed

.venv-pypy/.installed: pyproject.toml setup.cfg twinproxy/_speedups.c
	@PYTHON=$(PYTHON) scripts/ensure-system-deps.sh --bench
	test -x .venv-pypy/bin/python || pypy3 -m venv .venv-pypy
	.venv-pypy/bin/pip install -q --config-settings editable_mode=compat -e '.[test,compat]'
	.venv-pypy/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

deps:
	@PYTHON=$(PYTHON) scripts/ensure-system-deps.sh

venv: $(STAMP)

# compat editable mode: the default PEP 660 editable install hides the
# twistd plugin in twisted/plugins from twistd.
# The stamp follows the C scanners too: the install builds them in place.
$(STAMP): pyproject.toml setup.cfg twinproxy/_speedups.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip || true
	$(VENV)/bin/pip install -q --config-settings editable_mode=compat -e '.[test,compat]'
	$(VENV)/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

clean:
	rm -rf $(VENV) .venv-pypy run twisted/plugins/dropin.cache .pytest_cache twinproxy/*.so
