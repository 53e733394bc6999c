# Front door: `make serve` starts the server on the embedded default model; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 30000
ARGS ?=

.PHONY: setup serve test bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test,triton]'
	$(VPY) -c "from sglang_chelsea.model_loader import default_model_path; print('default model:', default_model_path())"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VPY) -m sglang_chelsea.launch_server --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q test $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
