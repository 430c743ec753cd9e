#!/usr/bin/env bash
# A CPU leave-one-domain-out sweep on RotatedDigits (scikit-learn's real 8x8 digits in 0/30/60 degree domains),
# W4A4, every test domain, seeds 0-2, 1000 steps; two runs at a time, one thread each; finished runs are skipped.
#   bash benchmarks/experiments/digits_sweep.sh OUT "ALGORITHM NAME [FLAGS...]" ...
# Each setting's runs go to OUT/ALGORITHM_NAME_t<test>_s<seed>, its FLAGS to the training script.
set -euo pipefail
out=$1; shift
mkdir -p "$out"
export OMP_NUM_THREADS=1 OUT_DIR=$out
run() {
  local algorithm=$1 name=$2 test=$3 seed=$4 dir=$OUT_DIR/$1_$2_t$3_s$4
  [[ -f $dir/results.json ]] && return 0
  python -m gaqat_kernels.train --dataset digits --algorithm "$algorithm" --test-domain "$test" --seed "$seed" \
    --trial-seed "$seed" --steps 1000 --checkpoint-freq 100 --device cpu --no-progress --out "$dir" "${@:5}" \
    > "$dir.log" 2>&1
}
export -f run
settings=("$@")
for seed in 0 1 2; do for test in 0 1 2; do for setting in "${settings[@]}"; do
  set -- $setting
  echo "$1 $2 $test $seed${3:+ ${*:3}}"  # no trailing blank: xargs -L would join the next line to it
done; done; done | xargs -P 2 -L 1 bash -c 'run "$@"' _
