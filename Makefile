# make run  : set up .venv, make sure the dataset is there, run the workflow + report.
# make test : same set-up, then the whole test suite (what .ci/run calls).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/config.yaml
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Idle OpenMP threads sleep instead of spinning: spinning threads of one job starve the
# other jobs' threads on a small machine.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test lint install dataset clean gpu-wheels

run: install dataset
	$(BIN)/snakemake --profile profiles/local --configfile $(CONFIG)
	$(BIN)/snakemake --profile profiles/local --configfile $(CONFIG) --report results/report.html

test: install dataset
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --configfile config/test.yaml

install: $(VENV)/.installed

# torch goes first and pinned: with torch already satisfied, no later requirement can pull
# a different (e.g. multi-GB CUDA) build. On GPU clusters the same pin installs PyPI's
# CUDA build.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

# The default config reads Debian's dataset-fashion-mnist; other data: set data.root.
dataset:
	@if [ -e $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if command -v apt-get >/dev/null; then \
		echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		$(SUDO) apt-get install -y -q dataset-fashion-mnist \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }; \
	else \
		echo "Fashion-MNIST is missing from $(FASHION_MNIST) and apt-get is not available." >&2; \
		echo "Install the package dataset-fashion-mnist, or download the four official IDX" >&2; \
		echo "files and set data.root in $(CONFIG) to their directory." >&2; \
		exit 1; \
	fi

clean:
	rm -rf results work .snakemake

# Wheels bench/gpu_check.sh installs on a GPU machine without internet (carry wheels/ there).
GPU_PYTHON ?= 3.12
gpu-wheels: install
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON) --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 \
		-d wheels -r bench/gpu_wheels.txt
