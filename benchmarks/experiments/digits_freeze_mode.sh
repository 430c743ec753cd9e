#!/usr/bin/env bash
# CPU sanity check of GAQAT's freeze modes on RotatedDigits (scikit-learn's real 8x8 digits in 0/30/60 degree
# domains), W4A4: LSQ+SAM, GAQAT freeze_mode=update, GAQAT freeze_mode=task, GAQAT with every layer's scales on the
# task gradient (alltask); every test domain, seeds 0-2,
# 1000 steps. Two runs at a time, one thread each (~35 min on a 2-core machine); finished runs are skipped.
#   bash benchmarks/experiments/digits_freeze_mode.sh [OUT=runs/digits_task]
#   python -m gaqat_kernels.report runs/digits_task [--metric val_acc]
set -euo pipefail
out=${1:-runs/digits_task}
mkdir -p "$out"
export OMP_NUM_THREADS=1 OUT_DIR=$out
# a setting: ALGORITHM MODE [NAME FLAGS...]; NAME (default MODE) names the run folders, FLAGS go to the script
run() {
  local algorithm=$1 mode=$2 test=$3 seed=$4 name=${5:-$2}
  local dir=$OUT_DIR/${algorithm}_${name}_t${test}_s${seed}
  [[ -f $dir/results.json ]] && return 0
  python -m gaqat_kernels.train --dataset digits --algorithm "$algorithm" --freeze-mode "$mode" --test-domain "$test" \
    --seed "$seed" --trial-seed "$seed" --steps 1000 --checkpoint-freq 100 --device cpu --no-progress --out "$dir" \
    "${@:6}" > "$dir.log" 2>&1
}
export -f run
# alltask: every layer's scales on the task gradient from the warm-up on (the absolute rule with threshold 0)
for seed in 0 1 2; do for test in 0 1 2; do
  for cfg in "lsq_sam update" "gaqat update" "gaqat task" "gaqat task alltask --freeze-rule absolute --threshold 0"; do
    set -- $cfg
    echo "$1 $2 $test $seed${3:+ ${*:3}}"  # no trailing blank: xargs -L would join the next line to it
  done
done; done | xargs -P 2 -L 1 bash -c 'run "$@"' _
