#!/usr/bin/env bash
# `make native-check`: the CPU kernel (fastai_regularize/csrc/fr_native.c) compiled with -Wall -Wextra -Werror in
# each variant the loader may build, then tests/native_check.c run over its entry points under AddressSanitizer and
# UndefinedBehaviorSanitizer. Skipped, with a message, without a C compiler or without sanitizer support.
set -euo pipefail
cd "$(dirname "$0")/.."
CC=${CC:-$(command -v cc || command -v gcc || command -v clang || true)}
if [ -z "$CC" ]; then echo "native-check: skipped, no C compiler (the losses then take their PyTorch path)"; exit 0; fi
SRC=fastai_regularize/csrc/fr_native.c
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# the loader's own flags (fastai_regularize.native._FLAGS) and variants (_VARIANTS), one variant a line
mapfile -t LINES < <(${PY:-.venv/bin/python} -c "from fastai_regularize.native import _FLAGS, _VARIANTS
print(' '.join(_FLAGS)); print('\n'.join(' '.join(v) for v in _VARIANTS))" 2>/dev/null)
if [ ${#LINES[@]} -lt 2 ]; then echo "native-check: could not read the loader's flags from fastai_regularize.native" >&2; exit 1; fi
FLAGS=${LINES[0]}
n=0
for variant in "${LINES[@]:1}"; do
  if ! "$CC" $FLAGS $variant -o "$OUT/probe.so" -x c - <<<'int f(void) { return 0; }' 2>/dev/null; then
    echo "native-check: $CC does not take '$variant': that variant not checked"; continue
  fi
  "$CC" $FLAGS $variant -Wall -Wextra -Werror "$SRC" -o "$OUT/fr_native.so" -lm
  n=$((n + 1))
done
echo "native-check: $SRC compiles cleanly with -Wall -Wextra -Werror ($n variants, $CC)"
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1"
OMP=$("$CC" -fopenmp -o "$OUT/probe" -x c - <<<'int main(void) { return 0; }' 2>/dev/null && echo -fopenmp || true)
if ! { "$CC" $SAN -o "$OUT/probe" -x c - <<<'int main(void) { return 0; }' && "$OUT/probe"; } >/dev/null 2>&1; then
  echo "native-check: sanitizer run skipped, $CC cannot build or run -fsanitize=address,undefined here"; exit 0
fi
"$CC" -std=gnu99 -Wall -Wextra -Werror $SAN $OMP "$SRC" tests/native_check.c -o "$OUT/native_check" -lm
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 OMP_NUM_THREADS=2 "$OUT/native_check"
