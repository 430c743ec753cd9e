"""DomainBed's image transforms written with PIL and torch only (torchvision is optional and absent on CPU
installs here): training augmentation and evaluation resize, both ending in ImageNet normalisation."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
_BILINEAR = Image.Resampling.BILINEAR if hasattr(Image, "Resampling") else Image.BILINEAR


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) images -> ImageNet-normalised float32, on x's device."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return (x - MEAN.to(x.device)) / STD.to(x.device)


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 (3, H, W) tensor normalised with ImageNet's mean and std."""
    return normalize(to_uint8_tensor(img))


class EvalTransform:
    """Resize to ``size`` x ``size`` (bilinear), to tensor, normalise."""

    def __init__(self, size: int):
        self.size = size

    def resized(self, img: Image.Image) -> Image.Image:
        """``img`` in RGB at ``size`` x ``size`` (bilinear), before conversion to a tensor."""
        return img.convert("RGB").resize((self.size, self.size), _BILINEAR)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_normalized_tensor(self.resized(img))


class TrainTransform:
    """DomainBed's augmentation: RandomResizedCrop(size, scale=(0.7, 1)), horizontal flip, ColorJitter(0.3,
    0.3, 0.3, 0.3), RandomGrayscale(0.1), to tensor, normalise. Uses Python's ``random`` (seeded per worker)."""

    def __init__(self, size: int):
        self.size = size

    def _crop(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        area = w * h
        for _ in range(10):
            target = area * random.uniform(0.7, 1.0)
            ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = random.randint(0, w - cw), random.randint(0, h - ch)
                return img.crop((x0, y0, x0 + cw, y0 + ch))
        side = min(w, h)
        return img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))

    @staticmethod
    def _jitter(img: Image.Image) -> Image.Image:
        ops = [
            lambda im: ImageEnhance.Brightness(im).enhance(random.uniform(0.7, 1.3)),
            lambda im: ImageEnhance.Contrast(im).enhance(random.uniform(0.7, 1.3)),
            lambda im: ImageEnhance.Color(im).enhance(random.uniform(0.7, 1.3)),
            TrainTransform._hue,
        ]
        random.shuffle(ops)
        for op in ops:
            img = op(img)
        return img

    @staticmethod
    def _hue(img: Image.Image) -> Image.Image:
        shift = int(random.uniform(-0.3, 0.3) * 255)
        h, s, v = img.convert("HSV").split()
        h = h.point(lambda p: (p + shift) % 256)
        return Image.merge("HSV", (h, s, v)).convert("RGB")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = self._crop(img.convert("RGB")).resize((self.size, self.size), _BILINEAR)
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = self._jitter(img)
        if random.random() < 0.1:
            img = img.convert("L").convert("RGB")
        return to_normalized_tensor(img)
