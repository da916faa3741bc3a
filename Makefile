# make demo: install into .venv and run the whole pipeline against the built-in local Polygon server.
# make test: install into .venv (with test extras) and run the test suite (and, in CI, the package test and the
# container image test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?= --max-events 40 --rate 20

.PHONY: demo test bench bench-debian12 install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The tests run the working tree (pytest and the child processes import it from here): an editable install with the
# test extras. The demo needs only the package and the local server's wsproto: a plain install, no test tools.
$(VENV)/.installed: $(BIN)/python setup.cfg setup.py
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.demo-installed: $(BIN)/python setup.cfg setup.py $(wildcard polygon_streamer/*.py polygon_streamer/*/*.py)
	$(BIN)/python -m pip install --quiet '.[mockserver]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.demo-installed
	$(BIN)/polygon-streamer demo $(DEMO_ARGS)

# The Debian package test needs root and apt and changes the system (a package, a user): it runs in CI
# (CI=true) or when asked (PACKAGE_TEST=1). There, the system tools some tests use are installed first (promtool,
# from Debian's prometheus package, checks the ops kit's alert rules; redis-server and redis-cli run the Redis sink's
# tests, which CI never skips); elsewhere those tests skip and say why.
SYSTEM_TEST_PACKAGES := prometheus redis-server redis-tools
# Tests run in parallel (pytest-xdist): most of a test's time is a real service, a server and the network at work, so
# four workers keep two cores busy. Each test has its own ports, files and processes; TEST_WORKERS=0 runs them in turn.
TEST_WORKERS ?= 4
test: install
	@if { [ "$${CI:-}" = true ] || [ -n "$${PACKAGE_TEST:-}" ]; } && command -v apt-get > /dev/null \
		&& ! { command -v promtool && command -v redis-server && command -v redis-cli; } > /dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(SYSTEM_TEST_PACKAGES) > /dev/null; fi
	$(BIN)/ruff check polygon_streamer tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)
	@if [ "$${CI:-}" = true ] || [ -n "$${PACKAGE_TEST:-}" ]; then bash tests/debian_package.sh \
		&& bash tests/container_image.sh; \
	else echo "Debian package and container image tests skipped: set PACKAGE_TEST=1 (needs root and apt)"; fi

bench: install
	$(BIN)/polygon-streamer bench $(BENCH_ARGS)

# The same benchmark on the library versions Debian 12 packages (what the .deb runs on).
.venv-deb12/.installed: setup.cfg setup.py
	$(PYTHON) -m venv .venv-deb12
	.venv-deb12/bin/python -m pip install --quiet websocket-client==1.2.3 ujson==5.7.0 pyzmq==24.0.1 \
		prometheus-client==0.16.0 click==8.1.3 wsproto==1.2.0 redis==4.3.4 'massive>=2.9'
	.venv-deb12/bin/python -m pip install --quiet --no-deps -e .
	touch $@

bench-debian12: .venv-deb12/.installed
	.venv-deb12/bin/polygon-streamer bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-deb12 build dist *.egg-info .pytest_cache
