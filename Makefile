# Front door: `make serve` starts the server on the embedded default model; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 30000
ARGS ?=
# SGLang's frontend language is a test client; only its wheel is installed (its own pinned
# dependencies would replace torch), its light imports come from the test extra.
SGLANG_VERSION ?= 0.5.23
WHEELS := $(VENV)/wheels

.PHONY: setup serve test bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test,triton]'
	$(VPY) -m pip download -q --no-deps sglang==$(SGLANG_VERSION) -d $(WHEELS)
	$(VPY) -m pip install -q --no-deps $(WHEELS)/sglang-$(SGLANG_VERSION)-*.whl
	$(VPY) -c "import sglang; from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint"
	$(VPY) -c "from sglang_chelsea.model_loader import default_model_path; print('default model:', default_model_path())"
	touch $(STAMP)

setup: $(STAMP)

# Prints the URL and a curl example once the server is ready.
serve: $(STAMP)
	$(VPY) -m sglang_chelsea.launch_server --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q test $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
