# The commands the README shows. `make demo` and `make test` set up the environment if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
CAI := $(VENV)/bin/cai
PYTHON ?= python3

.PHONY: setup browser demo test test-fast lint bench clean

setup: $(VENV)/.installed

# torch first: 2.13.0 is a CPU build; an unpinned torch would pull a multi-GB CUDA build. pip takes it
# (without byte-compiling its 2,300 modules up front) together with uv, which installs the rest in
# parallel and keeps the torch already there.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile torch==2.13.0 uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e '.[test]'
	touch $@

demo: setup
	$(CAI) run configs/smollm2-cpu.yaml --out runs/demo

# The report test renders report.html in Debian's headless Chromium (installed here when missing).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the report rendering test"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: setup browser
	$(PY) -m ruff check src tests bench tools
	CAI_REQUIRE_BROWSER=1 $(PY) -m pytest

lint: setup
	$(PY) -m ruff check src tests bench tools

test-fast: setup
	$(PY) -m pytest -m "not integration"

bench: setup
	$(PY) bench/generate.py
	$(PY) bench/train.py
	$(PY) bench/label.py
	$(PY) bench/rl.py
	$(PY) bench/critique.py
	$(PY) bench/server.py

clean:
	rm -rf runs build dist .pytest_cache
