# Two commands on a fresh machine (python3 >= 3.11 and make):
#   make demo   set up .venv and run the main job
#   make test   set up .venv and run the test suite
#   make test-fast  the suite without the tests marked slow (bundled models, training) or slurm (a local Slurm)
VENV ?= .venv
PY := $(VENV)/bin/python
THREADS ?= 2

.PHONY: setup demo test test-fast lint bench reproduce clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned exactly: the machine's local CPU build satisfies it; an open range would
	# pull a CUDA build of several GB.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,slurm,sae]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/illusions analyze dyck --simplify svd --rank 4 --threads $(THREADS)

reproduce: setup
	$(VENV)/bin/illusions reproduce --jobs 2 --threads 1 --overwrite

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not slurm"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks tools cli.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
