#!/usr/bin/env bash
# CPU sanity check of GAQAT's freeze modes on RotatedDigits (digits_sweep.sh: every test domain, seeds 0-2, 1000
# steps), W4A4: LSQ+SAM, GAQAT freeze_mode=update, GAQAT freeze_mode=task, and alltask: every layer's scales on the
# task gradient from the warm-up on (the absolute rule with threshold 0), and two sticky rules (update mode): a slower
# disorder EMA (decay 0.99) and a wider hysteresis (thaw at z = 0); and freeze_mode=project (PCGrad of the frozen
# layers' scale gradients) for the zscore rule and for every layer (absolute, threshold 0); and conflict_signal=step (the
# tracker compares the task gradient with SAM's own instead of the smoothness gradient). ~75 min on a 2-core machine.
#   bash benchmarks/experiments/digits_freeze_mode.sh [OUT=runs/digits_task]
#   python -m gaqat_kernels.report runs/digits_task [--metric val_acc]
set -euo pipefail
exec bash "$(dirname "$0")/digits_sweep.sh" "${1:-runs/digits_task}" "lsq_sam update --freeze-mode update" \
  "gaqat update --freeze-mode update" "gaqat task --freeze-mode task" \
  "gaqat alltask --freeze-mode task --freeze-rule absolute --threshold 0" \
  "gaqat sticky99 --freeze-mode update --decay 0.99" "gaqat hyst1 --freeze-mode update --hysteresis 1.0" \
  "gaqat project --freeze-mode project" "gaqat allproject --freeze-mode project --freeze-rule absolute --threshold 0" \
  "gaqat step --freeze-mode update --conflict-signal step"
