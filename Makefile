# Two commands on a fresh machine (python3 >= 3.11 and make):
#   make demo   set up .venv and run the main job
#   make test   set up .venv and run the test suite
#   make test-fast  the suite without the tests marked slow (bundled models, training) or slurm (a local Slurm)
#   make test-tl4   a second environment (.venv-tl4) with TransformerLens 4 and no SAELens, and the
#                   tests that do not need SAELens or TransformerLens 3.9 (docs/transformerlens4.md)
VENV ?= .venv
VENV_TL4 ?= .venv-tl4
PY := $(VENV)/bin/python
THREADS ?= 2

.PHONY: setup setup-tl4 demo test test-fast test-tl4 lint bench reproduce clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned exactly: the machine's local CPU build satisfies it; an open range would
	# pull a CUDA build of several GB.
	$(PY) -m pip install -q torch==2.13.0
	# tl3 (and sae, which needs it) keep TransformerLens 3.9: the bundled numbers are bit-exact there.
	$(PY) -m pip install -q -e ".[dev,slurm,sae,tl3]"
	touch $@

setup: $(VENV)/.installed

# TransformerLens 4 (TransformerBridge); SAELens does not install beside it.
$(VENV_TL4)/.installed: pyproject.toml
	python3 -m venv $(VENV_TL4)
	$(VENV_TL4)/bin/python -m pip install -q torch==2.13.0
	$(VENV_TL4)/bin/python -m pip install -q -e ".[dev,slurm,tl4]" torch==2.13.0
	touch $@

setup-tl4: $(VENV_TL4)/.installed

demo: setup
	$(VENV)/bin/illusions analyze dyck --simplify svd --rank 4 --threads $(THREADS)

reproduce: setup
	$(VENV)/bin/illusions reproduce --jobs 2 --threads 1 --overwrite

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not slurm"

test-tl4: setup-tl4
	OMP_NUM_THREADS=1 $(VENV_TL4)/bin/python -m pytest -q -m "not slow and not sae and not tl3 and not slurm"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks tools cli.py

clean:
	rm -rf $(VENV) $(VENV_TL4) .pytest_cache .ruff_cache
