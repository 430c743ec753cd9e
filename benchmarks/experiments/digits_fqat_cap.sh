#!/usr/bin/env bash
# CPU sanity check of FQAT's cap (--max-frozen-fraction) on RotatedDigits (digits_sweep.sh: every test domain,
# seeds 0-2, 1000 steps), W4A4: caps 0.25 (the default; 1 of the MNIST CNN's 3 quantized layers), 0.67 (2 of 3) and
# 1.0 (no cap). ~25 min on a 2-core machine.
#   bash benchmarks/experiments/digits_fqat_cap.sh [OUT=runs/digits_fqat_cap]
#   python -m gaqat_kernels.report runs/digits_fqat_cap [--metric val_acc]
set -euo pipefail
exec bash "$(dirname "$0")/digits_sweep.sh" "${1:-runs/digits_fqat_cap}" "fqat cap0.25 --max-frozen-fraction 0.25" \
  "fqat cap0.67 --max-frozen-fraction 0.67" "fqat cap1.0 --max-frozen-fraction 1.0"
