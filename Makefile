# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed

.PHONY: run test lint deps venv clean

run: deps venv
	scripts/run-demo.sh

test: deps venv
	$(VENV)/bin/ruff check twinproxy twisted tests
	$(VENV)/bin/python -m pytest

lint: venv
	$(VENV)/bin/ruff check twinproxy twisted tests

deps:
	@PYTHON=$(PYTHON) scripts/ensure-system-deps.sh

venv: $(STAMP)

# compat editable mode: the default PEP 660 editable install hides the
# twistd plugin in twisted/plugins from twistd.
$(STAMP): pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip || true
	$(VENV)/bin/pip install -q --config-settings editable_mode=compat -e '.[test]'
	$(VENV)/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

clean:
	rm -rf $(VENV) run twisted/plugins/dropin.cache .pytest_cache
