#!/usr/bin/env bash
# One call on the GPU box: build the extension against its torch, run the GPU tests, compute-sanitizer, benchmark.
#   bash benchmarks/gpu_check.sh [test|sanitize|bench|tune|conflict|step|export|ddp|all|none] [extra pytest args...]
# step: training-step benchmark (STEP_SUITES="resnet18 resnet50 vit"; STEP_ARGS row filters; STEP_TESTS=0 skips its tests,
# STEP_TESTS=compile runs the torch.compile tests instead).
# export: bench_export.py on the GPU at batch 1 and 64.
# ddp (a 2-GPU machine): the distributed tests with NCCL, then images/s of bench_ddp.py on 1 and 2 GPUs.
# BENCH_ARGS (e.g. --quick) is passed to benchmarks/bench_kernels.py; bench also runs bench_compile_overhead.py.
# tune: benchmarks/tools/tune_triton.py with TUNE_ARGS (default: the open Triton question of RESULTS.md, the split grid's
# rounding on innermost channels and short rows, then the quick benchmark of both backends).
# Logs and results go to $OUT (the device tool's output folder) or ./bench_out.
set -uo pipefail
mode=${1:-all}; shift || true
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Inductor's caches inside the (git-ignored) tree: the device keeps ignored files between calls on a warm machine, so
# rows prewarmed in one call (bench_train_step.py --prewarm N --prewarm-only) compile from the cache in the next.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
start=$(date +%s)
# In-place build: the box has no network, and its setuptools' editable install re-enters build isolation.
# GAQAT_PREBUILT=1 reuses an extension already in gaqat_kernels/ (e.g. carried from an earlier call).
if [[ ${GAQAT_PREBUILT:-0} == 1 ]] && ls gaqat_kernels/_C*.so >/dev/null 2>&1; then
  echo "gaqat_kernels: using the prebuilt $(ls gaqat_kernels/_C*.so)" > "$out/build.log"
else
  GAQAT_CUDA_ARCHS=${GAQAT_CUDA_ARCHS:-90} GAQAT_REQUIRE_EXT=1 MAX_JOBS=16 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 \
    || { tail -50 "$out/build.log"; exit 1; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
grep -E "gaqat_kernels:" "$out/build.log"
echo "build took $(( $(date +%s) - start )) s"
python3 -c "import gaqat_kernels as g; print('backends:', g.available_backends())" | tee -a "$out/device.txt"
rc=0
if [[ $mode == test || $mode == all ]]; then
  python3 -m pytest python_tests -q -p no:cacheprovider -x "$@" 2>&1 | tee "$out/tests.log" | tail -25
  rc=${PIPESTATUS[0]}
fi
if [[ $mode == sanitize || $mode == all ]]; then
  compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/tools/sanitize_cuda.py > "$out/sanitize.log" 2>&1
  echo "compute-sanitizer memcheck exit code: $?"; tail -3 "$out/sanitize.log"
fi
if [[ $mode == bench || $mode == all ]]; then
  # the peers of benchmarks/peers.py (NNCF, torchao) from wheels carried in .data/wheels, without their dependencies
  if ls .data/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install --no-deps --no-index -q .data/wheels/*.whl 2>&1 | grep -v "Running pip as"
  fi
  python3 benchmarks/bench_kernels.py --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" | grep -v "^|" | tail -5
  python3 benchmarks/bench_compile_overhead.py --device cuda 2>&1 | tee "$out/compile_overhead.log" | grep -v Warn
fi
if [[ $mode == tune ]]; then
  if [[ -n ${TUNE_ARGS:-} ]]; then
    python3 benchmarks/tools/tune_triton.py --out "$out" $TUNE_ARGS 2>&1 | grep -v Warn | tee "$out/tune.log"
  else  # the open question (RESULTS.md): Triton's split grid in one wave (--one-wave 1) or rounded up, where the
    # channel blocks do not divide the program slots; then both backends on every case with today's defaults
    python3 benchmarks/tools/tune_triton.py --out "$out/tune_one_wave" --cases "last axis" "short rows" --dtypes fp32 bf16 \
      --one-wave 0 1 2>&1 | grep -v Warn | tee "$out/tune_one_wave.log" | grep "x floor"
    python3 benchmarks/bench_kernels.py --out "$out/quick" --quick --impls triton cuda 2>&1 | grep -v Warn \
      | tee "$out/quick.log" | grep "x floor"
  fi
fi
if [[ $mode == conflict || $mode == all ]]; then
  python3 benchmarks/bench_conflict.py --out "$out" 2>&1 | tee "$out/bench_conflict.log" | tail -20
fi
if [[ $mode == export ]]; then  # size and latency of the packed model and its ONNX file against fake quant (H100)
  for batch in 1 64; do
    python3 benchmarks/bench_export.py --device cuda --batch $batch --reps ${EXPORT_REPS:-20} 2>&1 | grep -v Warn \
      | tee "$out/bench_export_cuda_b$batch.md"
  done
fi
if [[ $mode == step ]]; then  # training-step speed (STEP_SUITES, default resnet18; STEP_ARGS: row filters, e.g. --models)
  if [[ ${STEP_TESTS:-1} == 1 ]]; then
    python3 -m pytest python_tests/test_ops.py python_tests/test_algorithms.py python_tests/test_recompute.py -q -p no:cacheprovider \
      -k "eager_path or cuda_graph or synchronise or recompute" 2>&1 | tee "$out/tests_step.log" | tail -4
    rc=${PIPESTATUS[0]}
  elif [[ ${STEP_TESTS:-1} == compile ]]; then  # the torch.compile tests, on the GPU's backends too
    python3 -m pytest python_tests/test_ops.py python_tests/test_nn.py python_tests/test_conflict.py -q -p no:cacheprovider \
      -k "compile or triton_backward" 2>&1 | tee "$out/tests_compile.log" | tail -4
    rc=${PIPESTATUS[0]}
  fi
  if [[ ${STEP_SUITES:-} == *compile* ]]; then  # what Inductor generates for one decomposed quantizer (buffers, kernels)
    for dtype in fp32 bf16; do for lowering in decomposed triton_backward; do
      python3 benchmarks/tools/inductor_buffers.py --device cuda --dtype $dtype --lowering $lowering 2>&1 | grep -v Warn \
        | tee -a "$out/inductor_buffers.log"
    done; done
  fi
  ${STEP_TIMEOUT:+timeout $STEP_TIMEOUT} python3 benchmarks/bench_train_step.py --suite ${STEP_SUITES:-resnet18} ${STEP_ARGS:-} --out "$out" > "$out/bench_step.log" 2>&1
  grep -v '^{' "$out/bench_step.log" | tail -80
fi
if [[ $mode == ddp ]]; then
  export NCCL_NVLS_ENABLE=0  # no NVLink multicast on the lent machines
  python3 -m pytest python_tests/test_distributed.py python_tests/test_algorithms.py -q -p no:cacheprovider "$@" 2>&1 \
    | tee "$out/tests_ddp.log" | tail -8
  rc=${PIPESTATUS[0]}
  for n in 1 2; do
    torchrun --standalone --nproc_per_node=$n benchmarks/bench_ddp.py --out "$out" 2>&1 | tee -a "$out/bench_ddp.log" | tail -2
  done
fi
exit $rc
