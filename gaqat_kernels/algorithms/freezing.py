"""GAQAT and FQAT: SAM + LSQ QAT that freezes the layers whose task and smoothness gradients disagree.

Both run SAM's two passes, then (between the second backward and the update) feed every quantized layer's
scale gradients to a ``ConflictTracker`` (one launch, no host sync) and freeze the layers it marks
(``freeze_mode``, below: hold their update, zero their gradient, or drop SAM's term from it):

* GAQAT (arXiv 2412.05551): freezes the *scale* gradients of the layers whose disorder D stands out among
  the model's layers (after ``warmup_steps``): by default ``rule="zscore"``, D more than ``threshold``
  standard deviations above the layers' mean, thawing below ``threshold - hysteresis``. ``rule="absolute"``
  is a fixed bar on D (it froze every PACS layer at 0.5), ``"ratio"`` a relative excess over the mean.
  Optionally (``max_frozen_fraction``) at most that fraction of layers, the most disordered.
* FQAT (arXiv 2509.00859): freezes *whole layers* (weight, bias and scales), at most the
  ``max_frozen_fraction`` most disordered quantized layers that pass the same rule, re-chosen every step.

The disorder (see ``conflict.py``) is our reading of both papers; the equations are in
``kernels.reference.conflict_update_reference``. Freezing (``freeze_mode="update"``, the default) leaves a
frozen parameter and its optimizer state (moments, momentum buffer: every state tensor of its shape) as they were
before the step; its gradient is zeroed too. ``freeze_mode="gradient"`` only zeroes the gradient: then Adam's
moments, SGD's momentum and decoupled weight decay still move the parameter (under Adam a layer frozen for one
step moves by ~0.9 of a normal update), so a rule that freezes a layer for a few steps at a time barely acts.
``freeze_mode="task"`` freezes only the smoothness term: a frozen layer steps on its task gradient ``g(w)``
instead of SAM's ``g(w + e)``, i.e. without the part of its gradient that conflicts with the task's.
``freeze_mode="project"`` removes only the conflicting direction (PCGrad, per layer): where a frozen layer's SAM
gradient points against its task gradient, ``<g(w + e), g(w)> < 0``, it steps on ``g(w + e)`` minus its component
along ``g(w)``; a frozen layer whose two gradients agree steps on SAM's as if not frozen.

``conflict_signal`` picks the gradient the tracker compares with the task's: ``"smoothness"`` (the default,
GAQAT's reading) is ``g(w + e) - g(w)``; ``"step"`` is SAM's ``g(w + e)`` itself, so that a layer counts as
conflicting only where the update it would take opposes the task (on PACS the smoothness gradient opposes the task
in every layer while SAM's step opposes it on 5-12% of layer-steps: benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

from ..nn.convert import layer_scales, quantized_layers
from .base import SAMTraining
from .conflict import DEFAULT_RULE, ConflictTracker
from .stats_log import ConflictLog


FREEZE_MODES = ("update", "gradient", "task", "project")
# What the tracker compares the task gradient g(w) with: the smoothness gradient g(w + e) - g(w), or the step's
# own (SAM's) gradient g(w + e)
CONFLICT_SIGNALS = ("smoothness", "step")


def _masked_assign(tensors: List[torch.Tensor], values: torch.Tensor, mask: torch.Tensor) -> None:
    """``tensors`` (one dtype; read as their flattened concatenation) take ``values`` where ``mask``, exactly, in
    place: one concatenation, one select and one multi-tensor copy, no host sync."""
    kept = torch.where(mask, values, torch.cat([t.reshape(-1) for t in tensors]))
    torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(kept.split([t.numel() for t in tensors]), tensors)])


def _select_task_gradients(items: List[tuple]) -> None:
    """``grad = where(mask, task_grad, grad)`` for each ``(grad, task_grad, mask)`` (mask: bool, ``grad.numel()``
    elements), per dtype."""
    by_dtype: Dict[torch.dtype, list] = {}
    for item in items:
        by_dtype.setdefault(item[0].dtype, []).append(item)
    for group in by_dtype.values():
        _masked_assign([g for g, _, _ in group], torch.cat([t.reshape(-1) for _, t, _ in group]),
                       torch.cat([m for _, _, m in group]))


class HeldUpdate:
    """Undoes an optimizer step, per layer, for the layers a device mask names: their parameters and the
    optimizer state tensors of the same shape get their pre-step values back, bit for bit. Adam's step counter is
    not held (it keeps counting, as bias correction then does, for every parameter alike).

    ``snapshot(frozen)`` before ``optimizer.step()``, ``restore()`` after. Per dtype: one concatenation before, one
    concatenation, one select and one multi-tensor copy after; no host sync, so it runs inside a CUDA graph. State
    the optimizer creates during the first step (lazily) has no pre-step value and is left as the step made it.
    """

    def __init__(self, layer_params: List[List[torch.Tensor]], optimizer: torch.optim.Optimizer):
        self.layer_params = layer_params
        self.optimizer = optimizer
        self._key = None  # the optimizer state ``_groups`` was built from
        self._groups = None  # per dtype: (tensors, element -> layer index on their device)
        self._saved = None

    def _state_key(self):
        # the state tensors' identities: new ones appear at the optimizer's first step and after load_state_dict
        return tuple(id(v) for params in self.layer_params for p in params
                     for v in self.optimizer.state.get(p, {}).values())

    def _targets(self):
        by_dtype: Dict[torch.dtype, list] = {}
        for layer, params in enumerate(self.layer_params):
            for p in params:
                # "step" (Adam's counter) is never held, whatever its shape: a scalar parameter's counter would
                # otherwise be held and a per-channel one's not
                extra = [v for key, v in self.optimizer.state.get(p, {}).items()
                         if key != "step" and torch.is_tensor(v) and v.shape == p.shape and v.device == p.device]
                for t in [p] + extra:
                    by_dtype.setdefault(t.dtype, []).append((t, layer))
        groups = []
        for pairs in by_dtype.values():
            tensors = [t for t, _ in pairs]
            # filled on the device: no host-to-device copy inside a step
            layer_of = torch.cat([torch.full((t.numel(),), k, dtype=torch.long, device=t.device) for t, k in pairs])
            groups.append((tensors, layer_of))
        return groups

    def snapshot(self, frozen: torch.Tensor) -> None:
        """Remember the current values, and ``frozen`` (bool, one per layer), for ``restore``."""
        if frozen.dtype != torch.bool or tuple(frozen.shape) != (len(self.layer_params),):
            raise ValueError(f"frozen: expected a bool tensor of shape ({len(self.layer_params)},), one per layer, "
                             f"got {frozen.dtype} of shape {tuple(frozen.shape)}")
        key = self._state_key()
        if key != self._key:
            self._key, self._groups = key, self._targets()
        self._saved = (self._groups, frozen,
                       [torch.cat([t.detach().reshape(-1) for t in ts]) for ts, _ in self._groups])

    @torch.no_grad()
    def restore(self) -> None:
        """Put the snapshot's values back into the frozen layers' tensors."""
        groups, frozen, saved = self._saved
        for (tensors, layer_of), before in zip(groups, saved):
            _masked_assign(tensors, before, frozen[layer_of])
        self._saved = None


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
        freeze_mode: "update" (a frozen parameter and its optimizer state stay as they were this step),
            "gradient" (only its gradient is zeroed; the optimizer's moments and decay still move it) or "task"
            (it steps on its task gradient g(w) instead of SAM's g(w + e): the smoothness term is what is frozen)
            or "project" (where <g(w + e), g(w)> < 0 over the layer, g(w + e) loses its component along g(w)).
        conflict_signal: what the tracker compares with the task gradient g(w): "smoothness" (g(w + e) - g(w))
            or "step" (SAM's g(w + e), the gradient the update uses); the logged statistics are of that pair.
    """

    name = "gaqat"
    freezes_whole_layers = False

    def __init__(self, model: nn.Module, base_optimizer: type = torch.optim.SGD, *, rho: float = 0.05,
                 adaptive: bool = False, alpha: Optional[float] = None, decay: float = 0.9,
                 flip_weight: float = 0.5, rule: str = DEFAULT_RULE, threshold: Optional[float] = None,
                 hysteresis: Optional[float] = None, warmup_steps: int = 0, log_every: int = 0,
                 backend: str = "auto", max_frozen_fraction: Optional[float] = None, freeze_mode: str = "update",
                 conflict_signal: str = "smoothness", **optimizer_kwargs):
        if freeze_mode not in FREEZE_MODES:
            raise ValueError(f"freeze_mode: expected one of {FREEZE_MODES}, got {freeze_mode!r}")
        if conflict_signal not in CONFLICT_SIGNALS:
            raise ValueError(f"conflict_signal: expected one of {CONFLICT_SIGNALS}, got {conflict_signal!r}")
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
        self.freeze_mode = freeze_mode
        self.conflict_signal = conflict_signal
        held = [self._layer_params(m) if self.freezes_whole_layers else layer_scales(m) for _, m in layers]
        self._held = HeldUpdate(held, self.sam.base_optimizer) if freeze_mode == "update" else None

    @staticmethod
    def _layer_params(module: nn.Module):
        return [p for p in module.parameters() if p.requires_grad]

    @torch.no_grad()
    def between_passes(self) -> None:
        task, smooth = self.sam.flat_gradients(self.scales)
        frozen = self.tracker.update(task, smooth if self.conflict_signal == "smoothness" else task + smooth)
        self._frozen = frozen
        if self.freeze_mode == "task":
            self._step_on_task_gradients(frozen)
            return
        if self.freeze_mode == "project":
            self._project_off_task_gradients(frozen, task, smooth)
            return
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

    def _held_gradients(self, per_layer: torch.Tensor):
        """``(grad, task_grad, value)`` of every parameter that freezing acts on (scales; FQAT: every parameter of
        the layer) and that has both gradients; ``value``: its layer's entry of ``per_layer`` (one per layer), one per
        element (flat) for a scale, 0-dim for another parameter."""
        per_scale = per_layer[self._scale_layer].split(self._scale_sizes)
        per_param = per_layer[self._other_layer].unbind(0) if self._other_params else ()
        for p, value in [*zip(self.scales, per_scale), *zip(self._other_params, per_param)]:
            task = self.sam.state.get(p, {}).get("task_grad")
            if p.grad is not None and task is not None:
                yield p.grad, task, value

    def _step_on_task_gradients(self, frozen: torch.Tensor) -> None:
        """The frozen layers' gradients (scales; FQAT: every parameter of the layer) become their task gradients."""
        items = [(grad, task, mask.expand(grad.numel())) for grad, task, mask in self._held_gradients(frozen)]
        if items:
            _select_task_gradients(items)

    def _project_off_task_gradients(self, frozen: torch.Tensor, task: torch.Tensor, smooth: torch.Tensor) -> None:
        """PCGrad per frozen layer, over the parameters it freezes (GAQAT: its scales; FQAT: all of them):
        ``g -= min(0, <g, g_t>) / |g_t|^2 * g_t`` with ``g`` SAM's gradient and ``g_t`` the task gradient, so that
        ``<g, g_t> >= 0`` afterwards. ``task``/``smooth``: the scales' flat float32 gradients (``g = task + smooth``).
        Float32 dot products, no host sync."""
        dot = torch.zeros(len(self.layer_names), dtype=torch.float32, device=task.device)
        norm2 = torch.zeros_like(dot)
        dot.index_add_(0, self._scale_layer, task * (task + smooth))
        norm2.index_add_(0, self._scale_layer, task * task)
        others = []
        for p in self._other_params:
            task_grad = self.sam.state.get(p, {}).get("task_grad")
            others.append((p.grad, task_grad) if p.grad is not None and task_grad is not None else None)
        if others:
            zero = torch.zeros((), dtype=torch.float32, device=task.device)
            dot.index_add_(0, self._other_layer, torch.stack(
                [zero if o is None else torch.sum(o[0].float() * o[1].float()) for o in others]))
            norm2.index_add_(0, self._other_layer, torch.stack(
                [zero if o is None else torch.sum(o[1].float().square()) for o in others]))
        # a layer with a zero task gradient has dot = 0: its coefficient is 0 whatever norm2's floor
        coef = torch.where(frozen & (dot < 0), dot / norm2.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        items = list(self._held_gradients(coef))
        if items:
            factors = [(c.view_as(grad) if c.dim() else c).to(grad.dtype) for grad, _, c in items]
            torch._foreach_sub_([grad for grad, _, _ in items], torch._foreach_mul([t for _, t, _ in items], factors))

    def before_update(self) -> None:
        if self._held is not None:
            self._held.snapshot(self._frozen)

    def after_update(self) -> None:
        if self._held is not None:
            self._held.restore()

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
