# Quick start: `make demo` and `make test` on a fresh clone. Both create (or reuse) .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and on its own, so pip never resolves a multi-GB CUDA build where a CPU wheel is at hand.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.inrfmt-installed

.PHONY: demo test bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) tools/bench_all.py --cpu

clean:
	rm -rf build *.egg-info demo_out bench_out .pytest_cache
