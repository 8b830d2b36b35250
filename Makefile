# The README's two commands: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The strict editable install links each module by name: a module added or removed
# needs the install again, so the stamp depends on the list of modules too.
MODULES := $(VENV)/.modules
MODULE_LIST := $(sort $(wildcard daemon/*.py daemon/*/*.py events/*.py events/*/*.py actors/*.py actors/*/*.py gateway/*.py gateway/*/*.py))

.PHONY: run test lint typecheck pytest bench cluster clean FORCE

$(MODULES): FORCE
	@mkdir -p $(VENV)
	@echo '$(MODULE_LIST)' | cmp -s - $@ || echo '$(MODULE_LIST)' > $@

$(STAMP): pyproject.toml $(MODULES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --config-settings editable_mode=strict -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/sandboxd serve $(ARGS)

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Three nats-servers and three sandboxd nodes on loopback, until Ctrl-C (docs/cluster.md).
cluster: $(STAMP)
	$(BIN)/python -m sandboxd.cluster.local $(ARGS)

bench: $(STAMP)
	$(BIN)/pip install --quiet --config-settings editable_mode=strict -e '.[test,bench]'
	for b in bench/*.py; do $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
