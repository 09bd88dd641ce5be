# Two commands on a fresh machine; each creates .venv when missing.
#   make main   quantize EfficientNet-Lite0 (W8A8, W4A8, RTN) on the shared images, print float vs quantized top-1
#   make test   the test suite (CPU)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: main test bench lint

$(VENV)/.ready: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[models,onnx,plot,dev]'
	touch $@

main: $(VENV)/.ready
	$(VENV)/bin/fxq compare --model efficientnet_lite0 --weight-bits 8,4 --act-bits 8 --method rtn

test: $(VENV)/.ready
	$(PY) -m pytest -q tests

bench: $(VENV)/.ready
	$(PY) bench/calibration.py

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check fxq passes kernels tests bench
