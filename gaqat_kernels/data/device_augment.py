"""Image domains decoded once into uint8 tensors and augmented per batch on their device.

Decoding and augmenting JPEGs costs ~1.7 ms per 128 px image on one CPU core, so a 5001-step PACS run (96
images a step) needs ~800 core-seconds of data work, far more than its GPU work; several runs sharing one
machine starve. ``decode_domains`` reads every image once (resized to the model's input size with PIL's
bilinear filter, exactly as the evaluation transform does) and keeps it as uint8; ``DeviceAugment`` then
applies DomainBed's training augmentation to a whole batch with tensor ops: RandomResizedCrop(scale=(0.7, 1),
ratio=(3/4, 4/3)), horizontal flip, ColorJitter(0.3, 0.3, 0.3, 0.3) in a random order per image,
RandomGrayscale(0.1), ImageNet normalisation. Differences from the per-image PIL path: the crop is taken from
the already resized image (the same thing when the files have the input size, as PACS at 128 px with
``--image-size 128``), and resampling is bilinear without antialiasing (crops keep >= 70% of the area).
Random draws come from the caller's ``torch.Generator`` (checkpointed by the training script).
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import FileDomain, MultiDomainDataset, TensorDomain, to_device
from .transforms import EvalTransform, normalize, to_uint8_tensor

_LUMA = (0.299, 0.587, 0.114)


def _decode(domain: FileDomain, size: int) -> Tensor:
    resize = EvalTransform(size).resized
    out = torch.empty((len(domain), 3, size, size), dtype=torch.uint8)
    for i in range(len(domain)):
        out[i] = to_uint8_tensor(resize(domain.load(i)))
    return out


def decode_domains(dataset: MultiDomainDataset) -> MultiDomainDataset:
    """``dataset`` with every file domain decoded into a uint8 ``TensorDomain`` that normalises for
    evaluation and augments with ``DeviceAugment`` for training (tensor domains are returned as they are)."""
    size = dataset.input_shape[-1]
    augment = DeviceAugment(size)
    domains = []
    for d in dataset.domains:
        if isinstance(d, FileDomain):
            d = TensorDomain(_decode(d, size), torch.tensor(d.labels, dtype=torch.int64), transform=normalize,
                             train_transform=augment)
        domains.append(d)
    return MultiDomainDataset(dataset.name, dataset.domain_names, domains, dataset.input_shape, dataset.num_classes)


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    flat = maxc == minc
    ones = torch.ones_like(maxc)
    span = maxc - minc
    s = span / torch.where(flat, ones, maxc)
    div = torch.where(flat, ones, span)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack([h, s, maxc], dim=1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    sextant = torch.arange(6, device=x.device).view(1, 6, 1, 1) == i.unsqueeze(1)  # (B, 6, H, W)
    channels = [(v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q)]
    return torch.stack([(sextant * torch.stack(c, dim=1)).sum(1) for c in channels], dim=1)


def _per_image(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _per_image(factor)).clamp(0.0, 1.0)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (_per_image(factor) * x + (1 - _per_image(factor)) * mean).clamp(0.0, 1.0)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    return (_per_image(factor) * x + (1 - _per_image(factor)) * _gray(x)).clamp(0.0, 1.0)


def _hue_shift(x: Tensor, shift: Tensor) -> Tensor:
    hsv = _rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], dim=1))


def sample_params(n: int, height: int, width: int, generator: torch.Generator) -> Dict[str, Tensor]:
    """Per-image random choices of DomainBed's augmentation (on the CPU, from ``generator``)."""
    u = lambda *shape: torch.rand(shape, generator=generator, dtype=torch.float64)  # noqa: E731
    area = height * width
    target = area * (0.7 + 0.3 * u(n, 10))
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u(n, 10))
    cw, ch = torch.round(torch.sqrt(target * ratio)), torch.round(torch.sqrt(target / ratio))
    ok = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    first = ok.to(torch.int64).argmax(1, keepdim=True)  # torchvision's 10 tries: the first that fits
    side = float(min(height, width))
    found = ok.any(1)
    cw = torch.where(found, cw.gather(1, first).squeeze(1), torch.full((n,), side, dtype=torch.float64))
    ch = torch.where(found, ch.gather(1, first).squeeze(1), torch.full((n,), side, dtype=torch.float64))
    corner = u(n, 2)
    x0 = torch.where(found, torch.floor(corner[:, 0] * (width - cw + 1)), torch.floor((width - cw) / 2))
    y0 = torch.where(found, torch.floor(corner[:, 1] * (height - ch + 1)), torch.floor((height - ch) / 2))
    factors = (0.7 + 0.6 * u(n, 3)).float()
    return {"x0": x0, "y0": y0, "cw": cw, "ch": ch, "flip": u(n) < 0.5,
            "brightness": factors[:, 0], "contrast": factors[:, 1], "saturation": factors[:, 2],
            "hue": (-0.3 + 0.6 * u(n)).float(), "order": torch.argsort(u(n, 4), dim=1), "gray": u(n) < 0.1}


def apply_augment(x: Tensor, params: Dict[str, Tensor], size: int) -> Tensor:
    """Augment uint8 images ``x`` (B, 3, H, W) with ``params`` from ``sample_params``; normalised float32
    (B, 3, size, size) on x's device."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x: expected uint8 images of shape (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    p = {k: to_device(v, x.device) for k, v in params.items()}
    x = x.float().div_(255)
    _, _, height, width = x.shape
    # the crop box [x0, x0 + cw) x [y0, y0 + ch) onto [-1, 1]^2 (align_corners=False: pixel centres)
    sx, sy = p["cw"] / width, p["ch"] / height
    tx, ty = (2 * p["x0"] + p["cw"]) / width - 1, (2 * p["y0"] + p["ch"]) / height - 1
    sx = torch.where(p["flip"], -sx, sx)
    zeros = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zeros, tx], 1), torch.stack([zeros, sy, ty], 1)], 1).float()
    grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # ColorJitter's four operations (torchvision's tensor definitions) in a random order per image: at each
    # position, every operation runs on the images that take it there (rows chosen on the CPU: no sync)
    jitter = [(_brightness, "brightness"), (_contrast, "contrast"), (_saturation, "saturation"), (_hue_shift, "hue")]
    for position in range(4):
        for k, (op, name) in enumerate(jitter):
            rows = torch.nonzero(params["order"][:, position] == k).flatten()
            if rows.numel():
                rows = to_device(rows, x.device)
                x = x.index_copy(0, rows, op(x.index_select(0, rows), p[name].index_select(0, rows)))
    x = torch.where(_per_image(p["gray"]), _gray(x).expand_as(x), x)
    return normalize(x)


class DeviceAugment:
    """DomainBed's training augmentation for a batch of uint8 images (see the module docstring)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: Tensor, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> Tensor:
        """Augment this rank's share of a global batch: the choices are drawn for all ``world_size`` shares
        (so every rank's generator stays in step, and N ranks see what one process with N shares sees)."""
        n = x.shape[0]
        params = sample_params(world_size * n, x.shape[2], x.shape[3], generator)
        return apply_augment(x, {k: v[rank * n:(rank + 1) * n] for k, v in params.items()}, self.size)
