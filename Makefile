# Two commands on a fresh clone: `make run` (install, then the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Data: $LAB_DATA_DIR if set, else ../shared/data when it exists, else downloads to ~/.cache/lab/data.
export LAB_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export TORCHINDUCTOR_CACHE_DIR ?= $(abspath .cache/inductor)

.PHONY: install run test bench lint browser
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: install  ## the main job: the book's deep CNN on MNIST
	$(PY) -m lab +experiment=mnist_cnn $(ARGS)

test: install browser  ## two pytest workers, one torch thread each (both cores busy, no oversubscription); worksteal evens their ends
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal $(ARGS)

browser:  ## headless Chromium for the report-rendering test (Debian's package; skipped where apt is not ours)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get install -y -q chromium >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) ; } || \
	  echo "no chromium: the report's browser test will be skipped (install Debian's chromium package)"

bench: install
	$(PY) benchmarks/mnist_cnn.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
