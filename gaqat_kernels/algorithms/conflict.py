"""``ConflictTracker``: per-layer gradient conflict, disorder and the freeze mask, updated on the device.

Each step takes the task-loss and smoothness-loss gradients of every layer's quantizer scales, packed into
one flat buffer (one segment per layer), and in one kernel launch, with no host synchronisation:

1. reduces every segment to the conflict fraction c (elements with task * smooth < 0), the cosine, both
   norms, and the fractions of elements whose task / smoothness gradient flipped sign since the previous
   step (f_task, f_smooth);
2. updates the running average of the raw disorder  r = (1 - flip_weight) * c + flip_weight * (f_task +
   f_smooth) / 2  and bias-corrects it into the disorder D (an EMA with ``decay``);
3. writes the freeze mask: after ``warmup_steps`` updates, a layer is frozen while its score passes
   ``threshold`` (entering) or ``threshold - hysteresis`` (staying), limited to the ``max_frozen`` most
   disordered layers (ties: the earlier layer). The score is, by ``rule``:

       absolute:  D                                   (a fixed bar; selective only if tuned per model)
       zscore:    (D - mean_l D) / std_l D             (outliers among this step's layers)
       ratio:     D / mean_l D - 1                     (relative excess over the layers' mean)

   with mean and population std over the layers at this step, so the relative rules follow the model and
   the training phase without a hand-set level; a model whose layers all have the same D freezes none.

This is our reading of GAQAT's "gradient disorder" and selective freezing (arXiv 2412.05551) and FQAT's
disorder-guided adaptive freezing (arXiv 2509.00859); their method sections were not available to us, so
every choice is an argument (see DESIGN.md, "What the papers say").

Under ``torch.distributed`` (DDP) every rank feeds the tracker the same all-reduced gradients, and the
kernels sum in a fixed order, so the ranks already compute equal statistics. The tracker still makes the
agreement a guarantee rather than an assumption: after the kernel, one all-reduce of the packed
``[stats | ema]`` buffer averages them over the ranks, and the freeze mask is decided again from the
averaged disorder, identically on every rank (no host sync: the collective is enqueued on the stream).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.reference import FREEZE_RULES, bias_corrected_disorder, freeze_mask
from ..ops import conflict_update

# Per rule, in the rule's units: the entry bar, and the thawing margin below it (half a standard deviation;
# 2% of the mean disorder). The absolute rule's 0.5 is the original bar (every PACS layer is above it).
DEFAULT_RULE = "zscore"  # GAQAT's and FQAT's (see benchmarks/RESULTS.md, "Freezing rule ablation")
DEFAULT_THRESHOLD = {"absolute": 0.5, "zscore": 1.0, "ratio": 0.05}
DEFAULT_HYSTERESIS = {"absolute": 0.0, "zscore": 0.5, "ratio": 0.02}

STAT_NAMES = ("conflict", "cosine", "task_norm", "smooth_norm", "task_flips", "smooth_flips", "disorder")


@dataclass
class ConflictState:
    """The tracker's device state. ``stats``/``frozen`` hold the latest step's results."""

    signs: Tensor  # int8 (2, N): previous step's signs of task and smoothness gradients
    ema: Tensor  # float32 (S,): running average m of the raw disorder (before bias correction)
    step: Tensor  # int64 (1,): updates done so far
    counter: Tensor  # int32 (1,): the kernels' finished-program count; 0 between launches
    stats: Tensor  # float32 (S, 7): columns STAT_NAMES
    frozen: Tensor  # bool (S,)


class ConflictTracker:
    """Tracks scale-gradient conflict for ``len(sizes)`` layers whose scales hold ``sizes[k]`` elements.

    Args:
        sizes: elements per segment (a layer's quantizer scales, flattened in a fixed order); 0 allowed.
        device: where the state lives (the scales' device).
        decay: EMA decay of the disorder, in [0, 1).
        flip_weight: weight of the sign-flip rate against the conflict fraction in the raw disorder, [0, 1].
        rule: "absolute", "zscore" or "ratio": what ``threshold`` is compared with (see the module docstring).
        threshold: a layer freezes when its score exceeds this; None: ``DEFAULT_THRESHOLD[rule]``.
        hysteresis: a frozen layer thaws only when its score falls to ``threshold - hysteresis``; None:
            ``DEFAULT_HYSTERESIS[rule]``.
        warmup_steps: updates before any layer is frozen (statistics are still tracked).
        max_frozen: at most this many layers frozen per step (the most disordered); None: no limit.
        backend: "auto", "reference", "triton" or "cuda" (auto: cuda, else triton on GPUs; reference on CPU).
        sync_ranks: average the statistics over the ranks of ``process_group`` and decide the mask from the
            average; None: whenever ``torch.distributed`` is initialized with more than one rank.
        process_group: the group to agree over (None: the default group).
    """

    def __init__(self, sizes: Sequence[int], *, device="cpu", decay: float = 0.9, flip_weight: float = 0.5,
                 rule: str = "absolute", threshold: Optional[float] = None, hysteresis: Optional[float] = None,
                 warmup_steps: int = 0, max_frozen: Optional[int] = None,
                 backend: str = "auto", sync_ranks: Optional[bool] = None, process_group=None):
        sizes = list(sizes)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
            raise ValueError(f"sizes: expected non-negative ints, got {sizes!r}")
        if not (isinstance(decay, (int, float)) and 0 <= decay < 1):
            raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
        if not (isinstance(flip_weight, (int, float)) and 0 <= flip_weight <= 1):
            raise ValueError(f"flip_weight: expected a number in [0, 1], got {flip_weight!r}")
        if rule not in FREEZE_RULES:
            raise ValueError(f"rule: expected one of {FREEZE_RULES}, got {rule!r}")
        threshold = DEFAULT_THRESHOLD[rule] if threshold is None else threshold
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
        hysteresis = DEFAULT_HYSTERESIS[rule] if hysteresis is None else hysteresis
        if not (isinstance(hysteresis, (int, float)) and math.isfinite(hysteresis) and hysteresis >= 0):
            raise ValueError(f"hysteresis: expected a finite number >= 0, got {hysteresis!r}")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps: expected a non-negative int, got {warmup_steps!r}")
        if max_frozen is not None and not (isinstance(max_frozen, int) and max_frozen >= 0):
            raise ValueError(f"max_frozen: expected None or a non-negative int, got {max_frozen!r}")
        self.sizes = sizes
        self.decay, self.flip_weight, self.threshold = float(decay), float(flip_weight), float(threshold)
        self.rule, self.hysteresis = rule, float(hysteresis)
        self.warmup_steps = warmup_steps
        self.top_k = len(sizes) if max_frozen is None else min(max_frozen, len(sizes))
        self.backend = backend
        self.sync_ranks, self.process_group = sync_ranks, process_group
        device = torch.device(device)
        n, s = sum(sizes), len(sizes)
        self.offsets = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0).to(device)
        self.state = ConflictState(
            signs=torch.zeros(2, n, dtype=torch.int8, device=device),
            ema=torch.zeros(s, dtype=torch.float32, device=device),
            step=torch.zeros(1, dtype=torch.int64, device=device),
            counter=torch.zeros(1, dtype=torch.int32, device=device),
            stats=torch.zeros(s, len(STAT_NAMES), dtype=torch.float32, device=device),
            frozen=torch.zeros(s, dtype=torch.bool, device=device),
        )

    @property
    def numel(self) -> int:
        """Elements tracked over all segments (the packed scale gradients' length)."""
        return int(self.state.signs.shape[1])

    def update(self, task: Tensor, smooth: Tensor) -> Tensor:
        """One step from the flat float32 task and smoothness gradients (length ``sum(sizes)``).

        Returns the freeze mask (bool (S,), a view of the state: read or copy it before the next update).
        """
        for name, t in (("task", task), ("smooth", smooth)):
            if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.dim() != 1 or t.numel() != self.numel:
                raise ValueError(f"{name}: expected a float32 1-D tensor of {self.numel} elements, got "
                                 f"{getattr(t, 'dtype', type(t))} of shape {tuple(getattr(t, 'shape', ()))}")
            if t.device != self.offsets.device:
                raise ValueError(f"{name}: expected it on the tracker's device {self.offsets.device}, got {t.device}")
        before = self.state.frozen.clone() if self._world_size() > 1 else None
        conflict_update(task.contiguous(), smooth.contiguous(), self.offsets, self.state, decay=self.decay,
                        flip_weight=self.flip_weight, threshold=self.threshold, warmup=self.warmup_steps,
                        top_k=self.top_k, rule=self.rule, hysteresis=self.hysteresis, backend=self.backend)
        if before is not None:
            self._agree_across_ranks(before)
        return self.state.frozen

    def _world_size(self) -> int:
        if self.sync_ranks is False or not (dist.is_available() and dist.is_initialized()):
            if self.sync_ranks:
                raise RuntimeError("sync_ranks=True: torch.distributed is not initialized")
            return 1
        return dist.get_world_size(self.process_group)

    def _agree_across_ranks(self, before: Tensor) -> None:
        """One all-reduce of ``[stats | ema]``, then the mask from the averaged disorder (same on every rank)."""
        state, n = self.state, self.state.stats.numel()
        packed = torch.cat([state.stats.reshape(-1), state.ema])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.process_group)  # gloo has no AVG
        packed.mul_(1.0 / self._world_size())
        state.stats.copy_(packed[:n].view_as(state.stats))
        state.ema.copy_(packed[n:])
        disorder = bias_corrected_disorder(state.ema, state.step, self.decay)
        state.stats[:, STAT_NAMES.index("disorder")] = disorder
        state.frozen.copy_(freeze_mask(disorder, state.step - 1, before, rule=self.rule, threshold=self.threshold,
                                       hysteresis=self.hysteresis, warmup=self.warmup_steps, top_k=self.top_k))

    @property
    def stats(self) -> Tensor:
        """float32 (S, 7) statistics of the latest step, columns ``STAT_NAMES``."""
        return self.state.stats

    def state_dict(self) -> Dict[str, Tensor]:
        return {f.name: getattr(self.state, f.name).clone() for f in fields(ConflictState) if f.name != "counter"}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        for f in fields(ConflictState):
            if f.name == "counter":
                continue
            dst = getattr(self.state, f.name)
            if f.name not in state or state[f.name].shape != dst.shape:
                raise ValueError(f"state: expected {f.name!r} of shape {tuple(dst.shape)}")
            dst.copy_(state[f.name])
