# Two entry points that do all the set-up on a fresh machine (Python 3.11 or 3.12 with pip):
#   make demo   the main job: synthetic data -> TFRecords -> Grain -> tiny VideoRefer trained on the
#               local devices -> Bench-Q runner + ablation -> HF export -> vrefer-infer (about 8 min on 2 CPU cores)
#   make test   the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all venv clean

$(BIN)/.installed: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	# timm (the RegStage parity reference) without its torchvision dependency: there is no CPU
	# torchvision build for torch 2.13; tests/conftest.py stands in for the modules it imports.
	$(BIN)/pip install -q --no-deps "timm==1.0.3"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/vrefer-demo

test: venv
	$(BIN)/python -m pytest -q -m "not slow"

test-all: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
