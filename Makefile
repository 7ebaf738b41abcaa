# Everything runs inside .venv at the repo root; the first target that needs it creates it.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip.conf on these machines names local indexes that may be absent; drop that noise, keep real errors.
QUIET := 2>&1 | { grep -v '^WARNING: Location' || true; }

.PHONY: honest demo test test-oldest fuzz native-check check export wheel dist docs docs-check bench bench-parallel gpu-check quality imbalanced finetune tabular clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(QUIET)
	$(BIN)/pip install -q -e '.[dev]' $(QUIET)
	touch $(STAMP)

# The oldest fastai/torch that pyproject.toml allows, in a venv of their own (fastai 2.7.19 allows torch < 2.7).
# nbdev 3 needs a newer fastcore than fastai 2.7 allows, so this runs the pytest suite, not the notebooks.
OLDEST := .venv-oldest
OLDEST_PINS := fastai==2.7.19 torch==2.6.0 torchvision==0.21.0

$(OLDEST)/.installed: pyproject.toml setup.py
	test -x $(OLDEST)/bin/python || $(PY) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip $(QUIET)
	$(OLDEST)/bin/pip install -q $(OLDEST_PINS) -e '.[test]' $(QUIET)
	touch $@

# DEMO_PARALLEL: `--workers 2 --threads-per-run 1` once `make bench-parallel` shows the demo faster that way on this machine
DEMO_PARALLEL :=
demo: $(STAMP)
	$(BIN)/fastai-regularize compare $(DEMO_PARALLEL)

test: $(STAMP) check native-check
	MPLBACKEND=Agg $(BIN)/nbdev-test --n-workers 2
	MPLBACKEND=Agg $(BIN)/python -m pytest tests/ -q -p no:cacheprovider

# the differential tests of tests/test_differential.py with many more examples than `make test` gives them (20000 per
# property, about 6 min on 2 idle cores; HYPOTHESIS_MAX_EXAMPLES=N to change); failures are kept in .hypothesis/ and replayed
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/test_differential.py -q -p no:cacheprovider --hypothesis-show-statistics

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -c "import fastai, torch; print('fastai', fastai.__version__, 'torch', torch.__version__)"
	MPLBACKEND=Agg $(OLDEST)/bin/python -m pytest tests/ -q -p no:cacheprovider

check: $(STAMP)
	BIN=$(BIN) bash scripts/check_sync.sh

# the C kernel: -Wall -Wextra -Werror in every variant the loader builds, then a run under ASan and UBSan
native-check: $(STAMP)
	PY=$(BIN)/python bash scripts/native_check.sh

export: $(STAMP)
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean && $(BIN)/python scripts/make_readme.py

wheel: $(STAMP)
	rm -rf dist && $(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist . $(QUIET)
	$(BIN)/python -c "import zipfile,glob; n=zipfile.ZipFile(glob.glob('dist/*.whl')[0]).namelist(); print('\n'.join(n)); assert 'fastai_regularize/all.py' in n; assert 'fastai_regularize/csrc/fr_native.c' in n and 'fastai_regularize/csrc/fr_rows.h' in n, 'the C kernel is not in the wheel'"

# sdist and wheel into dist/ (the wheel is built from the sdist, so the sdist is complete), twine-checked. The version
# in their names is `__version__` in fastai_regularize/__init__.py, the one place it is written.
dist: $(STAMP)
	rm -rf dist && $(BIN)/python -m build -q --no-isolation --outdir dist . $(QUIET)
	$(BIN)/twine check --strict dist/*
	v=$$($(BIN)/python -c "import re; print(re.search(r'__version__ = \"(.+)\"', open('fastai_regularize/__init__.py').read())[1])") && \
	  ls dist/fastai_regularize-$$v.tar.gz dist/fastai_regularize-$$v-py3-none-any.whl

# The notebooks, run as nbdev-test runs them and shown with their outputs, and README.md as a static site in _docs/,
# with an API index; docs-check opens every page in headless Chromium (Debian's `chromium`) and saves screenshots
# (home page, API index, a notebook, a notebook's figure) in out/docs-check/.
docs: $(STAMP)
	$(BIN)/python scripts/make_docs.py

docs-check: docs
	$(BIN)/python scripts/check_docs.py _docs out/docs-check

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py

# the demo's 15 runs side by side (--workers 2 --threads-per-run 1) against one after another (--workers 1 --threads-per-run 2),
# 3 interleaved repetitions (about 35 min on 2 idle cores), and a check that the numbers do not depend on the worker count;
# writes benchmarks/results/parallel-cpu.{json,md}
bench-parallel: $(STAMP)
	$(BIN)/python benchmarks/parallel.py

# The one command a machine with CUDA runs: the tests marked `gpu` (the losses' CUDA path, the differential test on
# CUDA, the mixing callbacks under fastai's real to_fp16), the compatibility grid (tests/test_compat.py) on CUDA, then
# benchmarks/speed.py --device cuda (writes benchmarks/results/speed-cuda.*; QUICK=1: a few repetitions, nothing
# written), and a summary to quote: GPU, tests passed/failed/skipped, the speed ratios. Without CUDA: one line, exit 0.
gpu-check: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python scripts/gpu_check.py $(if $(QUICK),--quick)

# Fashion-MNIST with 2,000 training images: 40 epochs (8 configurations) and the short schedule beside it (10 epochs, 4
# configurations, whose runs hold TTA calibration and every TTA pass's logits for `make honest`), 3 paired seeds each, then
# how calibratable each 40-epoch model is. It resumes what benchmarks/results/ holds (with the committed runs it only
# rewrites the tables); `make quality FRESH=1` reruns everything (about 2 hours on 2 cores).
QUALITY := $(BIN)/python benchmarks/quality.py --subset 2000 --bs 128 --seeds 3 $(if $(FRESH),--fresh)
quality: $(STAMP)
	test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	$(QUALITY) --epochs 40 --configs baseline,label_smoothing,mixup,mixup+ls,mixup-off,mixup-dominant,manifold,regmixup
	$(QUALITY) --epochs 10 --configs baseline,label_smoothing,mixup,mixup+ls
	test ! -d benchmarks/results/fmnist-n2000-e40/preds || $(BIN)/python benchmarks/calibratability.py \
	  benchmarks/results/fmnist-n2000-e40/preds --name fashion-mnist $(if $(FRESH),--fresh)

# TTA calibration and conformal set sizes per configuration, from the 10-epoch Fashion-MNIST study's runs.csv and preds/
# (make quality writes them; preds/ is not committed, so a fresh clone runs make quality first)
honest: $(STAMP)
	$(BIN)/python benchmarks/honest.py benchmarks/results/fmnist-n2000-e10 --name fashion-mnist $(if $(FRESH),--fresh)

# Class-weighted losses on long-tailed Fashion-MNIST (rho 100: 2,480 training images; all 10,000 test images): baseline, label
# smoothing with PyTorch's and with the target class weighting, FLSD-53 focal loss, the confidence penalty, MixUp, MixUp with
# either label smoothing; 3 paired seeds, 15 epochs. It resumes what benchmarks/results/imbalanced-fmnist-r100-e15/ holds (with
# the committed runs it only rewrites the tables); `make imbalanced FRESH=1` reruns everything (hours on 2 shared cores).
imbalanced: $(STAMP)
	test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	$(BIN)/python benchmarks/imbalanced.py $(if $(FRESH),--fresh)

# Fine-tuning, the seed's regime: xresnet18 (half width) "pretrained" on Fashion-MNIST classes 0-4 (all 30,000 training
# images; the body is cached by its settings' hash under ~/.cache/fastai_regularize/pretrained), then fine_tune(7,
# freeze_epochs=1) on 1,000 images of classes 5-9 under 8 configurations, and the same model from scratch
# (fit_one_cycle(8)), 3 paired seeds, scored on the 5,000 test images of classes 5-9. It resumes what
# benchmarks/results/finetune-fmnist-n1000-e1+7/ holds; `make finetune FRESH=1` reruns everything, pretraining included.
finetune: $(STAMP)
	test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	$(BIN)/python benchmarks/finetune.py $(if $(FRESH),--fresh)

# Manifold MixUp on a tabular model: the digits as a table through tabular_learner, 5 paired seeds
tabular: $(STAMP)
	$(BIN)/python benchmarks/tabular.py

clean:
	rm -rf dist build *.egg-info
