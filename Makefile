# `make demo` and `make test` create .venv and install on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

DEMO_OUT ?= demo_out

demo: $(STAMP)
	$(BIN)/python jobs/embed.py --catalog engine/data/sdss_mgs.parquet --out $(DEMO_OUT)/sdss_mgs.lance --overwrite
	$(BIN)/python jobs/index.py --table $(DEMO_OUT)/sdss_mgs.lance
	$(BIN)/python -m engine search --table $(DEMO_OUT)/sdss_mgs.lance --id 1000000001 -k 10
	$(BIN)/python jobs/join.py --catalog engine/data/sdss_mgs.parquet --table $(DEMO_OUT)/sdss_mgs.lance --out $(DEMO_OUT)/sdss_mgs_with_zphot.fits

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

.PHONY: install demo test
