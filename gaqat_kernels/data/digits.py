"""A tiny real multi-domain dataset for fast tests and laptops: scikit-learn's 1,797 handwritten 8x8 digits
(shipped inside scikit-learn), in rotation domains like RotatedMNIST."""
from __future__ import annotations

import numpy as np
import torch

from .base import MultiDomainDataset, TensorDomain


def rotated_digits(root=None, seed: int = 0, angles=(0, 30, 60)) -> MultiDomainDataset:
    """Digits (1, 8, 8) in [0, 1], shuffled with ``seed``, domain i = images ``[i::n]`` rotated by ``angles[i]``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits dataset needs scikit-learn (pip install scikit-learn)") from e
    from PIL import Image

    data = load_digits()
    images = (data.images / 16.0 * 255.0).round().astype(np.uint8)
    labels = torch.from_numpy(data.target.astype(np.int64))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order.numpy()], labels[order]
    n = len(angles)
    resample = Image.Resampling.BILINEAR if hasattr(Image, "Resampling") else Image.BILINEAR
    domains = []
    for i, angle in enumerate(angles):
        rotated = np.stack([np.asarray(Image.fromarray(img).rotate(angle, resample=resample, fillcolor=0))
                            for img in images[i::n]])
        domains.append(TensorDomain(torch.from_numpy(rotated).float().div_(255.0).unsqueeze(1), labels[i::n]))
    return MultiDomainDataset("RotatedDigits", [str(a) for a in angles], domains, (1, 8, 8), 10)
