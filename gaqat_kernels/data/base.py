"""One interface for multi-domain datasets: named domains, each a map-style dataset of (image, label).

``TensorDomain`` keeps a whole domain as tensors (the MNIST variants, digits): batches are gathered by
index on whatever device the tensors live on, with no worker processes. ``FileDomain`` decodes image files
on demand through a transform (PACS, VLCS, ...).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def seed_hash(*args) -> int:
    """A stable 31-bit seed from any printable arguments (as DomainBed derives its split seeds)."""
    return int(hashlib.md5(str(args).encode()).hexdigest(), 16) % (2 ** 31)


def to_device(t: Tensor, device) -> Tensor:
    """``t`` (a CPU tensor) on ``device``; to a GPU through pinned memory without blocking the host.

    A plain host-to-GPU copy waits for all queued GPU work (PyTorch synchronises the stream after it), so the
    per-step copies of batch indices and augmentation choices would stall the host once per copy until the
    previous training step has finished, instead of letting it prepare the next step meanwhile.
    """
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)  # the pinned block is reused only after the copy


def split_indices(n: int, k: int, holdout_fraction: float, seed: int) -> Tuple[Tensor, Tensor]:
    """``(in_indices, out_indices)`` of ``MultiDomainDataset.split`` for domain ``k`` of ``n`` examples: a
    function of the sizes and seeds alone, so saved per-example predictions can be split without the data."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed_hash(seed, k)))
    n_out = int(n * holdout_fraction)
    return order[n_out:], order[:n_out]


class TensorDomain(torch.utils.data.Dataset):
    """A domain held as ``x`` (N, C, H, W) and ``y`` (N,) int64 tensors.

    ``x`` is float32 model input, or raw images (uint8) with ``transform`` (a batch of x -> model input,
    for evaluation) and ``train_transform`` (``(batch, generator)`` -> augmented model input, for training),
    both run on the batch's device.
    """

    def __init__(self, x: Tensor, y: Tensor, transform: Optional[Callable] = None,
                 train_transform: Optional[Callable] = None):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"y: expected {x.shape[0]} labels for {x.shape[0]} images, got {y.shape[0]}")
        self.x, self.y, self.transform, self.train_transform = x, y, transform, train_transform

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def rows(self, index) -> "TensorDomain":
        """The examples at ``index`` (a slice or index tensor), with the same transforms."""
        return TensorDomain(self.x[index], self.y[index], self.transform, self.train_transform)

    def head(self, n: int) -> "TensorDomain":
        """The first ``n`` examples (the MNIST variants are already shuffled)."""
        return self.rows(slice(0, n))

    def to(self, device) -> "TensorDomain":
        """The same domain with its tensors on ``device``: training batches of tensor domains are gathered there."""
        return TensorDomain(self.x.to(device), self.y.to(device), self.transform, self.train_transform)

    def model_input(self, x: Tensor) -> Tensor:
        """A batch of rows of ``x`` as the model takes them for evaluation."""
        return x if self.transform is None else self.transform(x)


class FileDomain(torch.utils.data.Dataset):
    """A domain of encoded images: ``load(i)`` returns a PIL image, ``transform`` makes it a tensor."""

    def __init__(self, load: Callable[[int], object], labels: Sequence[int], transform: Callable):
        self.load, self.labels, self.transform = load, list(labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.load(i)), self.labels[i]

    def head(self, n: int) -> "FileDomain":
        """``n`` examples spread evenly over the domain (files are stored class by class)."""
        keep = [int(k * len(self.labels) / n) for k in range(n)] if n < len(self.labels) else list(range(len(self.labels)))
        return FileDomain(lambda i, load=self.load: load(keep[i]), [self.labels[k] for k in keep], self.transform)


class Subset(torch.utils.data.Dataset):
    """Rows ``indices`` of a domain, optionally with another transform (train augmentation vs evaluation)."""

    def __init__(self, domain, indices: Tensor, transform: Optional[Callable] = None):
        self.domain, self.indices, self.transform = domain, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        if self.transform is not None and isinstance(self.domain, FileDomain):
            return self.transform(self.domain.load(j)), self.domain.labels[j]
        return self.domain[j]


@dataclass
class MultiDomainDataset:
    """Named domains sharing an input shape and a label set.

    ``train_transform`` (file domains only) is DomainBed's augmentation, applied to the training split.
    """

    name: str
    domain_names: List[str]
    domains: List[torch.utils.data.Dataset]
    input_shape: Tuple[int, int, int]
    num_classes: int
    train_transform: Optional[Callable] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.domains)

    def domain_index(self, domain) -> int:
        """The index of ``domain`` given as an int or a name."""
        if isinstance(domain, int) and 0 <= domain < len(self.domains):
            return domain
        if isinstance(domain, str):
            if domain in self.domain_names:
                return self.domain_names.index(domain)
            if domain.isdigit() and int(domain) < len(self.domains):
                return int(domain)
        raise ValueError(f"test domain: expected an index below {len(self.domains)} or one of "
                         f"{self.domain_names}, got {domain!r}")

    def split(self, k: int, holdout_fraction: float, seed: int):
        """``(in_split, out_split)`` of domain ``k``: a seeded random ``1 - holdout`` / ``holdout`` partition."""
        in_idx, out_idx = split_indices(len(self.domains[k]), k, holdout_fraction, seed)
        domain = self.domains[k]
        if isinstance(domain, TensorDomain):
            return domain.rows(in_idx), domain.rows(out_idx)
        return Subset(domain, in_idx, self.train_transform), Subset(domain, out_idx)
