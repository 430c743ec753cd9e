#!/usr/bin/env bash
# Freezing-rule ablation beside the GPU tests.  bash benchmarks/experiments/freeze_rule_ablation.sh rmnist|pacs   (ABL_DEADLINE, ABL_TESTS=0/1)
set -u
mode=$1
out=${OUT:-bench_out}; mkdir -p "$out" runs
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
W=.data/weights/efficientnet-lite0-57934424.pth
if [[ -f .data/wgz/efficientnet-lite0-57934424.pth.bsxz && ! -f $W ]]; then
  mkdir -p .data/weights && python3 benchmarks/tools/pack_weights.py unpack .data/wgz/efficientnet-lite0-57934424.pth.bsxz $W
fi
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d 2>/dev/null || echo "mps already up"
DL=${ABL_DEADLINE:-500}
extra="--cuda-graph --backend triton --skip-train-in-eval"
if [[ $mode == pacs ]]; then
  common="--suite pacs_w4 --algorithms gaqat --seeds 0 --data-root .data/pacs128 --pretrained $W --no-eoq --deadline-s $DL"
  python3 benchmarks/experiments/sweep_dg.py --out runs/abl_z10 $common --test-domains ${ABL_Z_DOMAINS:-0 1 2 3} --parallel 4 \
    --extra --freeze-rule zscore --threshold 1.0 $extra > "$out/abl_pacs_z10.log" 2>&1 &
  python3 benchmarks/experiments/sweep_dg.py --out runs/abl_r05 $common --test-domains ${ABL_R_DOMAINS:-0 1} --parallel 4 \
    --extra --freeze-rule ratio --threshold 0.05 $extra > "$out/abl_pacs_r05.log" 2>&1 &
else
  common="--suite rmnist_w4 --algorithms gaqat --seeds 0 --data-root .data/mnist --no-eoq --deadline-s $DL"
  python3 benchmarks/experiments/sweep_dg.py --out runs/abl_rm_z10 $common --parallel 6 \
    --extra --freeze-rule zscore --threshold 1.0 $extra > "$out/abl_rm_z10.log" 2>&1 &
  python3 benchmarks/experiments/sweep_dg.py --out runs/abl_rm_r05 $common --parallel 6 \
    --extra --freeze-rule ratio --threshold 0.05 $extra > "$out/abl_rm_r05.log" 2>&1 &
fi
if [[ ${ABL_TESTS:-1} == 1 ]]; then
  GAQAT_CUDA_ARCHS=90 GAQAT_REQUIRE_EXT=1 MAX_JOBS=10 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 || tail -30 "$out/build.log"
  echo "build done at $(( $(date +%s) - start )) s"
  python3 -c "import gaqat_kernels as g; print('backends:', g.available_backends())"
  timeout 240 python3 -m pytest python_tests/test_tracker.py python_tests/test_backend_vocabulary.py python_tests/test_conflict.py \
    python_tests/test_algorithms.py python_tests/test_distributed.py -q -p no:cacheprovider > "$out/tests.log" 2>&1; echo "tests rc $?"; tail -4 "$out/tests.log"
  echo "tests done at $(( $(date +%s) - start )) s"
  compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/tools/sanitize_cuda.py > "$out/sanitize.log" 2>&1
  echo "compute-sanitizer exit $?"; tail -2 "$out/sanitize.log"
fi
wait
echo "sweeps done at $(( $(date +%s) - start )) s"; tail -n 3 "$out"/abl_*.log
tar czf "$out/abl_$mode.tar.gz" --exclude=model.pt --exclude=checkpoint.pt --exclude='*.png' --exclude='test_probs.pt' runs/abl_*
ls -la "$out"
