# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
TEST := $(VENV)/.installed-test

.PHONY: install demo test lint clean

# torch first, from the pinned CUDA build (it runs on CPU), then vlp itself
$(CORE): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e .
	touch $(CORE)

# the test tools and the optional extras whose parity and metric tests run in CI; the browser
# test of vlp serve's page drives the distribution's chromium (no browser is downloaded)
$(TEST): $(CORE)
	$(BIN)/pip install -e ".[test,interop,caption,ray,hub,serve]"
	if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && apt-get install -y chromium; fi
	touch $(TEST)

install: $(TEST)

demo: $(CORE)
	$(BIN)/vlp demo --out runs/demo

test: $(TEST)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q --timeout=1800

lint: $(TEST)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
