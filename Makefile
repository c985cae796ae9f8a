# BrainWavLM, step by step. Two commands for a fresh clone:
#   make demo   # the whole study on the simulated default, stage by stage
#   make test   # the test suite
# One target per stage, so you can rerun the stage you changed: make 01, make 02, ...
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= data
RESULTS ?= results

.PHONY: demo test 01 02 clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: 01 02

01: $(VENV)/.installed
	$(PY) 01_prepare_data.py --data $(DATA)

02: $(VENV)/.installed
	$(PY) 02_baseline_ridge.py --data $(DATA) --results $(RESULTS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DATA) $(RESULTS) checkpoints
