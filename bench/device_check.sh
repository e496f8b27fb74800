#!/usr/bin/env bash
# One prepared device call: offline install, the `gpu` tests (bf16 included), the benchmarks at real shapes,
# JSON under $OUT, a short table printed last. Sized for a single call of at most 7 minutes on one H100.
#
#   device run:  bash bench/device_check.sh            (carry .whl when it holds an xformers wheel)
#
# Each stage has its own time limit so one slow stage cannot eat the others; a failed stage is reported and the
# script goes on, exiting non-zero at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 secs=$2
    shift 2
    echo "=== $name (limit ${secs}s)"
    local t0=$SECONDS
    timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc in $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || status=1
}

# Offline install: the image has torch, triton, numpy, pytest; the project itself needs no download.
python -m pip install -q --no-index --no-deps --no-build-isolation -e . || status=1
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (xformers): see the device README
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python -m beit.env | tee "$OUT/env.txt"
export BEIT_GIT_SHA=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

stage gpu_tests 150 python -m pytest -q -m gpu tests -p no:cacheprovider
for script in bench/bench_*.py; do
    name=$(basename "$script" .py)
    stage "$name" 120 python "$script" --out "$OUT/$name.json"
done

echo
echo "=== summary"
python bench/summarize.py "$OUT"/bench_*.json | tee "$OUT/summary.md"
exit $status
