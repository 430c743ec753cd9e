#!/usr/bin/env bash
# CPU sanity check of FQAT's cap (--max-frozen-fraction) on RotatedDigits (scikit-learn's real 8x8 digits in
# 0/30/60 degree domains), W4A4, the same runs as digits_freeze_mode.sh otherwise (every test domain, seeds 0-2,
# 1000 steps): caps 0.25 (the default; 1 of the MNIST CNN's 3 quantized layers), 0.67 (2 of 3) and 1.0 (no cap).
# Two runs at a time, one thread each (~25 min on a 2-core machine); finished runs are skipped.
#   bash benchmarks/experiments/digits_fqat_cap.sh [OUT=runs/digits_fqat_cap]
#   python -m gaqat_kernels.report runs/digits_fqat_cap [--metric val_acc]
set -euo pipefail
out=${1:-runs/digits_fqat_cap}
mkdir -p "$out"
export OMP_NUM_THREADS=1 OUT_DIR=$out
run() {
  local cap=$1 test=$2 seed=$3 dir=$OUT_DIR/fqat_cap$1_t$2_s$3
  [[ -f $dir/results.json ]] && return 0
  python -m gaqat_kernels.train --dataset digits --algorithm fqat --max-frozen-fraction "$cap" --test-domain "$test" \
    --seed "$seed" --trial-seed "$seed" --steps 1000 --checkpoint-freq 100 --device cpu --no-progress --out "$dir" \
    > "$dir.log" 2>&1
}
export -f run
for seed in 0 1 2; do for test in 0 1 2; do for cap in 0.25 0.67 1.0; do
  echo "$cap $test $seed"
done; done; done | xargs -P 2 -L 1 bash -c 'run "$@"' _
