# Everything runs inside .venv at the repo root; the first target that needs it creates it.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip.conf on these machines names local indexes that may be absent; drop that noise, keep real errors.
QUIET := 2>&1 | { grep -v '^WARNING: Location' || true; }

.PHONY: demo test check export wheel bench quality clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(QUIET)
	$(BIN)/pip install -q -e '.[dev]' $(QUIET)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fastai-regularize compare

test: $(STAMP) check
	MPLBACKEND=Agg $(BIN)/nbdev-test --n-workers 2
	MPLBACKEND=Agg $(BIN)/python -m pytest tests/ -q -p no:cacheprovider

check: $(STAMP)
	BIN=$(BIN) bash scripts/check_sync.sh

export: $(STAMP)
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean && $(BIN)/python scripts/make_readme.py

wheel: $(STAMP)
	rm -rf dist && $(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist . $(QUIET)
	$(BIN)/python -c "import zipfile,glob; n=zipfile.ZipFile(glob.glob('dist/*.whl')[0]).namelist(); print('\n'.join(n)); assert 'fastai_regularize/all.py' in n"

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py

quality: $(STAMP)
	test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	$(BIN)/python benchmarks/quality.py --subset 10000 --epochs 20 --seeds 3
	$(BIN)/python benchmarks/quality.py --subset 10000 --epochs 5 --seeds 3

clean:
	rm -rf dist build *.egg-info
