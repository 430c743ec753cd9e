#!/usr/bin/env bash
# One device call of a leave-one-domain-out sweep (benchmarks/experiments/sweep_dg.py), packed for the trip back.
#   bash benchmarks/experiments/sweep_gpu.sh NAME [sweep_dg.py arguments...]
# Runs share the GPU through CUDA MPS when the box has it (without MPS, processes time-slice the GPU and
# many small runs barely overlap). Finished runs already under runs/NAME (carried from an earlier call) are
# skipped. The results without model files and checkpoints (with each run's test_probs.pt, what EoQ needs) go to
# $OUT/sweep_NAME.tar.gz (split into .part-aa, -ab, ... when over 15 MiB), the log to $OUT/sweep_NAME.log.
# Runs stopped at --deadline-s keep their checkpoints under runs/NAME on the device: a later call on the same warm
# machine continues them if it does not carry runs/NAME (a carried folder replaces the machine's copy).
# Leave a 600 s call ~60 s after --deadline-s: stopping the runs, the sweep's EoQ and the packing took 35-57 s
# (a call with --deadline-s 560 hit its limit and its tar did not come back; the next call's tar had its runs).
# --no-eoq skips the sweep's EoQ, which merge_sweep.py redoes locally from the tar anyway.
# SWEEP_MPS=0: no MPS (when other GPU work shares the call). SWEEP_KEEP_MODELS=1: also the finished runs' selected
# models (model.pt, not the checkpoints) as $OUT/sweep_NAME_models.tar.part-aa, -ab, ... (15 MiB parts, under the
# device tool's per-file limit); `cat sweep_NAME_models.tar.part-* | tar xf -` in the repository root puts them
# back under runs/NAME (EoQ itself needs only test_probs.pt).
# Weights carried packed as .data/wgz/F.bsxz (benchmarks/tools/pack_weights.py; the whole carry must stay under the device
# tool's 64 MiB) are unpacked to .data/weights/F first, unless already there (kept on a warm machine between calls).
set -uo pipefail
name=$1; shift
out=${OUT:-bench_out}
mkdir -p "$out" runs
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/sweep_$name.log"
for packed in .data/wgz/*.bsxz; do
  [[ -f $packed ]] || continue
  target=.data/weights/$(basename "${packed%.bsxz}")
  [[ -f $target ]] || { mkdir -p .data/weights && python3 benchmarks/tools/pack_weights.py unpack "$packed" "$target"; }
done
mps=0
if [[ ${SWEEP_MPS:-1} == 1 ]] && command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  # a daemon left running by an earlier call on this machine (one killed at its time limit) serves this one too
  if nvidia-cuda-mps-control -d 2>/dev/null || echo get_server_list | nvidia-cuda-mps-control >/dev/null 2>&1; then
    mps=1
  fi
fi
echo "MPS: $mps; commit ${GAQAT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" | tee -a "$out/sweep_$name.log"
python3 benchmarks/experiments/sweep_dg.py --out "runs/$name" "$@" 2>&1 | tee -a "$out/sweep_$name.log"
rc=${PIPESTATUS[0]}
[[ $mps == 1 ]] && echo quit | nvidia-cuda-mps-control
tar czf "$out/sweep_$name.tar.gz" --exclude=model.pt --exclude=checkpoint.pt --exclude='*.tmp' --exclude='*.png' \
  "runs/$name"
# over the device tool's 16 MiB per file (twelve GAQAT runs' conflict.jsonl): 15 MiB parts, which merge_sweep.py
# reads back from the name of the first, sweep_NAME.tar.gz.part-aa
if (( $(stat -c %s "$out/sweep_$name.tar.gz") > 15 * 1024 * 1024 )); then
  split -b 15m "$out/sweep_$name.tar.gz" "$out/sweep_$name.tar.gz.part-" && rm "$out/sweep_$name.tar.gz"
fi
if [[ ${SWEEP_KEEP_MODELS:-0} == 1 ]]; then
  find "runs/$name" -name model.pt -print0 | tar cf - --null -T - | split -b 15m - "$out/sweep_${name}_models.tar.part-"
fi
exit $rc
