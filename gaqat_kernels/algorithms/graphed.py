"""``CUDAGraphStep``: a whole training step (every pass, the conflict tracker, the update) as one CUDA graph.

In eager mode the host issues every kernel of a step one by one; for a quantized network with SAM that is
thousands of launches, and small layers leave the GPU waiting for the host. Captured once and replayed, a
step costs the host two input copies and one replay, whatever the network. This works because no
algorithm here synchronises with the host inside a step.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .base import TrainingAlgorithm


class CUDAGraphStep:
    """Runs ``algorithm.step`` on the batch ``(x, y)``; after ``warmup`` eager steps, as a CUDA graph replay.

    Args:
        algorithm: any ``TrainingAlgorithm`` (ERM, SAM, GAQAT, FQAT).
        loss_fn: ``loss_fn(x, y) -> loss`` (forward only; the backward is done here).
        warmup: eager steps first, on a side stream (lazy initialisation, optimizer state, autotuning).

    Every call is one real training step, the capturing call included (it captures, then replays). Later
    calls copy the batch into the captured input buffers, so ``x`` and ``y`` must keep their shapes and
    dtypes. Requirements: CUDA tensors; an optimizer that can be captured (``Adam``/``AdamW`` with
    ``capturable=True``; ``SGD``); no DistributedDataParallel. The returned loss is a buffer that the next
    call overwrites: read or copy it before then.
    """

    def __init__(self, algorithm: TrainingAlgorithm, loss_fn: Callable[[Tensor, Tensor], Tensor], warmup: int = 3):
        if not (isinstance(warmup, int) and warmup >= 1):
            raise ValueError(f"warmup: expected an int >= 1 (eager steps before capture), got {warmup!r}")
        for group in algorithm.optimizer.param_groups:
            if group.get("capturable") is False and "capturable" in algorithm.optimizer.defaults:
                raise ValueError("algorithm: its optimizer must be built with capturable=True to run in a CUDA graph")
        self.algorithm, self.loss_fn, self.warmup = algorithm, loss_fn, warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.eager_steps = 0
        self._x = self._y = self._loss = None

    def _closure(self, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        def closure():
            loss = self.loss_fn(x, y)
            loss.backward()
            return loss
        return closure

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if not x.is_cuda:
            raise ValueError(f"x: CUDA graphs need CUDA tensors, got a tensor on {x.device}")
        if self.eager_steps < self.warmup:
            self.eager_steps += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.algorithm.step(self._closure(x, y))
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self._x, self._y = x.clone(), y.clone()
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: DataLoader pin-memory threads may touch CUDA while this thread captures
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self._loss = self.algorithm.step(self._closure(self._x, self._y))
        else:
            if x.shape != self._x.shape or y.shape != self._y.shape:
                raise ValueError(f"x, y: a captured step needs the shapes it was captured with, "
                                 f"{tuple(self._x.shape)} and {tuple(self._y.shape)}")
            self._x.copy_(x, non_blocking=True)
            self._y.copy_(y, non_blocking=True)
        self.graph.replay()
        self.algorithm.end_step()
        return self._loss
