"""GAQAT and FQAT: SAM + LSQ QAT that freezes the layers whose task and smoothness gradients disagree.

Both run SAM's two passes, then (between the second backward and the update) feed every quantized layer's
scale gradients to a ``ConflictTracker`` (one launch, no host sync) and zero the gradients of the layers
it marks frozen, so this step's update leaves them alone:

* GAQAT (arXiv 2412.05551): freezes the *scale* gradients of the layers whose disorder D stands out among
  the model's layers (after ``warmup_steps``): by default ``rule="zscore"``, D more than ``threshold``
  standard deviations above the layers' mean, thawing below ``threshold - hysteresis``. ``rule="absolute"``
  is a fixed bar on D (it froze every PACS layer at 0.5), ``"ratio"`` a relative excess over the mean.
  Optionally (``max_frozen_fraction``) at most that fraction of layers, the most disordered.
* FQAT (arXiv 2509.00859): freezes *whole layers* (weight, bias and scales), at most the
  ``max_frozen_fraction`` most disordered quantized layers that pass the same rule, re-chosen every step.

The disorder (see ``conflict.py``) is our reading of both papers; the equations are in
``kernels.reference.conflict_update_reference``. Freezing zeroes the gradient: a base optimizer with
momentum or decoupled weight decay still moves a frozen parameter by its momentum / decay term.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn

from ..nn.convert import layer_scales, quantized_layers
from .base import SAMTraining
from .conflict import DEFAULT_RULE, ConflictTracker
from .stats_log import ConflictLog


class GAQAT(SAMTraining):
    """SAM + LSQ QAT with conflict-driven freezing of scale gradients (GAQAT).

    Args:
        model: a model with quantized layers (``gaqat_kernels.nn.quantize_model``).
        base_optimizer: optimizer class; ``**optimizer_kwargs`` go to it (lr, momentum, ...).
        rho, adaptive, alpha: SAM's radius, ASAM, SAGM (see ``SAMTraining``).
        decay, flip_weight, rule, threshold, hysteresis, warmup_steps: the tracker's disorder EMA and freezing
            rule (``ConflictTracker``; None: the rule's default); the rule defaults to ``DEFAULT_RULE`` here,
            warm-up to 0 (the training script uses 10% of the steps).
        max_frozen_fraction: None (no limit) or a number in [0, 1]: each step at most
            ``max(1, floor(fraction * layers))`` layers (0: none), the most disordered above ``threshold``.
        log_every: record per-layer statistics every this many steps (0: never); see ``log``.
        backend: the tracker's kernel backend.
    """

    name = "gaqat"
    freezes_whole_layers = False

    def __init__(self, model: nn.Module, base_optimizer: type = torch.optim.SGD, *, rho: float = 0.05,
                 adaptive: bool = False, alpha: Optional[float] = None, decay: float = 0.9,
                 flip_weight: float = 0.5, rule: str = DEFAULT_RULE, threshold: Optional[float] = None,
                 hysteresis: Optional[float] = None, warmup_steps: int = 0, log_every: int = 0,
                 backend: str = "auto", max_frozen_fraction: Optional[float] = None, **optimizer_kwargs):
        if max_frozen_fraction is not None and not (isinstance(max_frozen_fraction, (int, float))
                                                    and 0 <= max_frozen_fraction <= 1):
            raise ValueError(f"max_frozen_fraction: expected None or a number in [0, 1], got {max_frozen_fraction!r}")
        super().__init__(model, base_optimizer, rho=rho, adaptive=adaptive, alpha=alpha, **optimizer_kwargs)
        layers = quantized_layers(model)
        if not layers:
            raise ValueError(f"model: {self.name} needs quantized layers; run gaqat_kernels.nn.quantize_model first")
        if max_frozen_fraction is None:
            max_frozen = None
        else:
            max_frozen = 0 if max_frozen_fraction == 0 else max(1, math.floor(max_frozen_fraction * len(layers)))
        self.layer_names = [name for name, _ in layers]
        self.scales = [s for _, m in layers for s in layer_scales(m)]
        sizes = [sum(s.numel() for s in layer_scales(m)) for _, m in layers]
        device = self.scales[0].device
        self.tracker = ConflictTracker(sizes, device=device, decay=decay, flip_weight=flip_weight, rule=rule,
                                       threshold=threshold, hysteresis=hysteresis, warmup_steps=warmup_steps,
                                       max_frozen=max_frozen, backend=backend)
        # Scale gradients are multiplied by a per-element 0/1 factor (one multi-tensor kernel, equal shapes);
        # FQAT's other layer parameters by a per-parameter factor.
        self._scale_sizes = [p.numel() for p in self.scales]
        self._scale_layer = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)
        others = [(k, p) for k, (_, m) in enumerate(layers) for p in self._layer_params(m)
                  if self.freezes_whole_layers and not any(p is s for s in layer_scales(m))]
        self._other_params = [p for _, p in others]
        self._other_layer = torch.tensor([k for k, _ in others], dtype=torch.int64, device=device)
        self.log = ConflictLog(self.layer_names, log_every)

    @staticmethod
    def _layer_params(module: nn.Module):
        return [p for p in module.parameters() if p.requires_grad]

    @torch.no_grad()
    def between_passes(self) -> None:
        task, smooth = self.sam.flat_gradients(self.scales)
        frozen = self.tracker.update(task, smooth)
        keep = (~frozen).to(torch.float32)
        per_element = keep[self._scale_layer].split(self._scale_sizes)
        pairs = [(p.grad, k.view_as(p.grad)) for p, k in zip(self.scales, per_element) if p.grad is not None]
        if pairs:
            torch._foreach_mul_(*map(list, zip(*pairs)))
        if self._other_params:
            grads, factors = [], []
            for p, factor in zip(self._other_params, keep[self._other_layer].unbind(0)):
                if p.grad is not None:
                    grads.append(p.grad)
                    factors.append(factor.to(p.grad.dtype))
            if grads:
                torch._foreach_mul_(grads, factors)

    def on_step_end(self) -> None:
        step = self.steps - 1
        if self.log.due(step):
            self.log.record(step, self.tracker.stats, self.tracker.state.frozen)

    def state_dict(self) -> Dict:
        return {**super().state_dict(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        self.tracker.load_state_dict(state["tracker"])


class FQAT(GAQAT):
    """SAM + LSQ QAT with disorder-guided adaptive freezing of whole layers (FQAT).

    Same arguments as ``GAQAT``; ``max_frozen_fraction`` defaults to 0.25 here: each step at most
    ``max(1, floor(fraction * layers))`` layers, the most disordered ones that pass the rule, are frozen.
    """

    name = "fqat"
    freezes_whole_layers = True

    def __init__(self, model: nn.Module, base_optimizer: type = torch.optim.SGD, *,
                 max_frozen_fraction: Optional[float] = 0.25, **kwargs):
        super().__init__(model, base_optimizer, max_frozen_fraction=max_frozen_fraction, **kwargs)
