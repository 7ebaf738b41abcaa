#!/usr/bin/env bash
# Fails when the library, the notebooks or README.md are not what the notebooks say they should be:
# runs nbdev-export, nbdev-clean and the README generator, and compares every file before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
snap() { find nbs fastai_regularize README.md -type f -not -path '*/__pycache__/*' -not -path '*/.ipynb_checkpoints/*' | sort | xargs sha1sum; }
before=$(snap)
# nbdev-export rewrites pyproject.toml even when nothing changes; keep its time so make's .venv stamps stay valid
keep=$(mktemp); cp -p pyproject.toml "$keep"
$BIN/nbdev-export
if cmp -s pyproject.toml "$keep"; then touch -r "$keep" pyproject.toml; fi
rm -f "$keep"
$BIN/nbdev-clean
$BIN/python scripts/make_readme.py
after=$(snap)
if [ "$before" != "$after" ]; then
  echo "check_sync: nbdev-export / nbdev-clean / make_readme.py changed these files; run 'make export' and commit:" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
echo "check_sync: library, notebooks and README.md are in sync"
