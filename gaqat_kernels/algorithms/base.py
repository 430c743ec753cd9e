"""The training-step interface shared by every algorithm, and the two without freezing: ERM and SAM.

An algorithm owns the optimizer and runs one training step per ``step(closure)`` call. ``closure()``
computes the loss on the current batch, calls ``backward()`` and returns the loss; the algorithm zeroes
gradients before every pass, so the closure must not. SAM-based algorithms call it twice per step.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from .sam import SAM


def trainable(model: nn.Module):
    """The parameters an algorithm updates: those with ``requires_grad``."""
    return [p for p in model.parameters() if p.requires_grad]


class TrainingAlgorithm:
    """Base class: ``step(closure) -> loss``, ``optimizer`` (for LR schedulers), state dicts."""

    name = "base"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer
        self.steps = 0

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        raise NotImplementedError

    def end_step(self) -> None:
        """Host-side bookkeeping after a step (count, logging). Skipped while a CUDA graph captures the step:
        ``CUDAGraphStep`` calls it after every replay instead."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        self.steps += 1
        self.on_step_end()

    def on_step_end(self) -> None:
        """Subclasses: host-side work after step ``self.steps - 1`` (device work belongs in ``step``)."""

    def state_dict(self) -> Dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: Dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


class ERM(TrainingAlgorithm):
    """Empirical risk minimisation: one forward/backward and one optimizer step (also plain LSQ QAT)."""

    name = "erm"

    def __init__(self, model: nn.Module, base_optimizer: type = torch.optim.SGD, **optimizer_kwargs):
        super().__init__(model, base_optimizer(trainable(model), **optimizer_kwargs))

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure()
        self.optimizer.step()
        self.end_step()
        return loss


class SAMTraining(TrainingAlgorithm):
    """SAM (or ASAM with ``adaptive=True``, SAGM with ``alpha``) around ``base_optimizer``; no freezing.

    ``between_passes(self)`` hook: subclasses act on the task and SAM gradients after the second backward,
    before the parameters are restored and updated (GAQAT/FQAT freeze there).
    """

    name = "sam"

    def __init__(self, model: nn.Module, base_optimizer: type = torch.optim.SGD, *, rho: float = 0.05,
                 adaptive: bool = False, alpha: Optional[float] = None, **optimizer_kwargs):
        sam = SAM(trainable(model), base_optimizer, rho=rho, adaptive=adaptive,
                  alpha=alpha, **optimizer_kwargs)
        super().__init__(model, sam)
        self.sam = sam

    def between_passes(self) -> None:
        """Called after the second backward (gradients at ``w + e``), before restore and update."""

    def before_update(self) -> None:
        """Called with the parameters restored to ``w``, just before the base optimizer's step."""

    def after_update(self) -> None:
        """Called after the update. Like the other hooks: device work only (part of a captured CUDA graph step)."""

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        self.sam.zero_grad(set_to_none=True)
        loss = closure()
        self.sam.first_step(zero_grad=True)
        closure()
        self.between_passes()
        self.sam.second_step(before_update=self.before_update)
        self.after_update()
        self.end_step()
        return loss
