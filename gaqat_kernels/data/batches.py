"""Endless per-domain minibatches for training, drawn with replacement (as DomainBed's infinite loaders).

Every step draws ``world_size * batch_size`` indices per domain from one seeded generator, identical on
every rank, and rank r keeps rows ``[r * batch_size, (r + 1) * batch_size)``: N ranks together see exactly
the examples one process with an N-times larger batch sees.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import torch
from torch import Tensor

from .base import TensorDomain, to_device


class GlobalDrawSampler(torch.utils.data.Sampler):
    """Endless indices of one rank's share of every global batch (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError(f"n: a domain to sample from needs at least one example, got {n}")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        lo = self.rank * self.batch_size
        while True:
            draw = torch.randint(self.n, (self.world_size * self.batch_size,), generator=generator)
            yield from draw[lo:lo + self.batch_size].tolist()


class DomainBatches:
    """One minibatch per training domain per step.

    Tensor domains are indexed directly on their device from one seeded generator (its state is
    checkpointed, so a resumed run draws the same batches), then go through the domain's
    ``train_transform`` (drawing from the same generator) if it has one; file domains go through
    DataLoader workers.
    """

    def __init__(self, splits: Sequence, batch_size: int, device, seed: int, workers: int, rank: int = 0,
                 world_size: int = 1):
        self.splits, self.batch_size, self.device = list(splits), batch_size, device
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.tensors = all(isinstance(s, TensorDomain) for s in self.splits)
        if self.tensors:
            self.splits = [s.to(device) for s in self.splits]
        else:
            self.iterators = []
            for k, s in enumerate(self.splits):
                sampler = GlobalDrawSampler(len(s), batch_size, seed + k, rank, world_size)
                loader = torch.utils.data.DataLoader(s, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                                     pin_memory=torch.device(device).type == "cuda",
                                                     persistent_workers=workers > 0, drop_last=True)
                self.iterators.append(iter(loader))

    def next(self) -> List[Tuple[Tensor, Tensor]]:
        """``[(x, y)]``, one pair per domain, on ``device``."""
        if self.tensors:
            out, lo = [], self.rank * self.batch_size
            for s in self.splits:
                draw = torch.randint(len(s), (self.world_size * self.batch_size,), generator=self.generator)
                idx = to_device(draw[lo:lo + self.batch_size], self.device)
                x = s.x[idx]
                if s.train_transform is not None:
                    x = s.train_transform(x, self.generator, self.rank, self.world_size)
                elif s.transform is not None:
                    x = s.transform(x)
                out.append((x, s.y[idx]))
            return out
        return [tuple(t.to(self.device, non_blocking=True) for t in next(it)) for it in self.iterators]
