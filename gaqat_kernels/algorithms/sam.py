"""Sharpness-aware minimisation (Foret et al., ICLR 2021) and its adaptive variant ASAM (Kwon et al., 2021).

One SAM step is two forward/backward passes:

    g_task = grad L(w)                                  first pass, at w
    e      = rho * T^2 g_task / ||T g_task||            T = |w| for ASAM, the identity for SAM
    g_sam  = grad L(w + e)                              second pass, at the perturbed weights
    w     <- base_optimizer(w, g_sam)                   after restoring w

SAGM (Wang et al., CVPR 2023) in our reading (DESIGN.md): ``e = (rho / ||g_task|| - alpha) * g_task`` and
the update uses ``(g_task + g_sam) / 2``; ``SAM(..., alpha=a)`` selects it, from the same two passes.

For QAT with flatness objectives the gradient of the smoothness loss L(w + e) - L(w) is what GAQAT compares
with the task gradient; to first order in the same two passes it is ``g_smooth = g_sam - g_task``.
``SAM.gradients(params)`` returns ``(g_task, g_smooth)`` for any parameters (e.g. every quantizer scale).

Every reduction stays on the device (``torch._foreach_norm``), so a step issues no host synchronisation.

Under DistributedDataParallel both backward passes all-reduce the gradients, so ``e`` is computed from the
all-reduced (global-batch) gradient ``g_task`` and is the same on every rank, and ``g_sam`` is the
all-reduced gradient at ``w + e``: N ranks take exactly the step one process takes on the N-times larger
batch (not the per-replica "m-sharpness" variant, which would perturb each rank by its local gradient).
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


class SAM(torch.optim.Optimizer):
    """Wraps a base optimizer (built here from ``base_optimizer`` and ``**kwargs``) with SAM's two passes.

    Use ``first_step()`` after the first backward and ``second_step()`` after the second, or ``step(closure)``
    with a closure that zeroes gradients, runs forward and backward, and returns the loss.

    Args:
        params: parameters or parameter groups.
        base_optimizer: an optimizer class, e.g. ``torch.optim.SGD``.
        rho: neighbourhood radius (SAM's default 0.05).
        adaptive: ASAM's scale-invariant neighbourhood (``T = |w|``); then rho is typically larger (0.5-2).
        eps: added to the gradient norm.
        alpha: None for SAM; a number selects SAGM's perturbation ``(rho / ||g|| - alpha) g`` and its averaged
            update ``(g(w) + g(w + e)) / 2``.
    """

    def __init__(self, params: Iterable, base_optimizer: type, rho: float = 0.05, adaptive: bool = False,
                 eps: float = 1e-12, alpha: Optional[float] = None, **kwargs):
        if not (isinstance(rho, (int, float)) and rho >= 0):
            raise ValueError(f"rho: expected a non-negative number, got {rho!r}")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(f"base_optimizer: expected a torch.optim.Optimizer class, got {base_optimizer!r}")
        if alpha is not None and not (isinstance(alpha, (int, float)) and alpha >= 0):
            raise ValueError(f"alpha: expected None or a non-negative number, got {alpha!r}")
        self.alpha = alpha
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eps=eps, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _with_grad(self, group) -> List[Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save ``g_task``, then move every parameter to ``w + e`` (no host sync)."""
        scaled = []
        for group in self.param_groups:
            params = self._with_grad(group)
            grads = [p.grad for p in params]
            if group["adaptive"]:
                grads = torch._foreach_mul([p.abs() for p in params], grads)
            scaled.extend(grads)
        norms = torch._foreach_norm(scaled) if scaled else []
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else None
        for group in self.param_groups:
            params = self._with_grad(group)
            if not params:
                continue
            factor = group["rho"] / (total + group["eps"])
            if self.alpha is not None:
                factor = factor - self.alpha
            grads = [p.grad for p in params]
            e = torch._foreach_mul(grads, factor)
            if group["adaptive"]:
                magnitude = torch._foreach_abs(params)
                e = torch._foreach_mul(torch._foreach_mul(e, magnitude), magnitude)
            # copies by fused multi-tensor kernels; w is restored by copy: (w + e) - e need not round to w
            for p, g_task, w in zip(params, torch._foreach_mul(grads, 1.0), torch._foreach_mul(params, 1.0)):
                self.state[p]["task_grad"] = g_task
                self.state[p]["w"] = w
            torch._foreach_add_(params, e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, before_update: Optional[Callable[[], None]] = None) -> None:
        """Restore ``w`` and apply the base optimizer with ``g_sam`` (SAGM: ``(g_task + g_sam) / 2``);
        ``before_update()`` runs between the two (parameters back at ``w``, optimizer not yet stepped)."""
        params = [p for group in self.param_groups for p in group["params"] if "w" in self.state.get(p, {})]
        if params:
            torch._foreach_copy_(params, [self.state[p].pop("w") for p in params])
            if self.alpha is not None:
                with_grad = [p for p in params if p.grad is not None]
                grads = [p.grad for p in with_grad]
                torch._foreach_add_(grads, [self.state[p]["task_grad"] for p in with_grad])
                torch._foreach_mul_(grads, 0.5)
        if before_update is not None:
            before_update()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def gradients(self, params: Iterable[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """``(g_task, g_smooth)`` of ``params`` after the second backward: ``g_smooth = g_sam - g_task``."""
        task, smooth = [], []
        for p in params:
            g_task = self.state[p].get("task_grad")
            if g_task is None or p.grad is None:
                raise ValueError("params: gradients are known only after first_step() and the second backward")
            task.append(g_task)
            smooth.append(p.grad - g_task)
        return task, smooth

    def state_dict(self):
        """The base optimizer's state (momentum etc.); SAM's per-step buffers are not worth saving."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups

    def flat_gradients(self, params: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """``(g_task, g_smooth)`` of ``params`` concatenated into two flat float32 buffers (three launches).

        Parameters without a gradient contribute zeros.
        """
        task, total = [], []
        for p in params:
            g_task = self.state[p].get("task_grad") if p in self.state else None
            if g_task is None or p.grad is None:
                zeros = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                task.append(zeros)
                total.append(zeros)
            else:
                task.append(g_task.reshape(-1).float())
                total.append(p.grad.reshape(-1).float())
        if not task:
            empty = torch.zeros(0, dtype=torch.float32)
            return empty, empty
        flat_task = torch.cat(task)
        return flat_task, torch.cat(total).sub_(flat_task)

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """Both passes: ``closure`` must zero the gradients, compute the loss, call backward, return the loss."""
        if closure is None:
            raise ValueError("closure: SAM.step needs a closure that re-evaluates the loss (two passes)")
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss
