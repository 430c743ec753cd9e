"""Batched augmentation on the device (data/device_augment.py): each operation against its definition, the
random choices against DomainBed's ranges, and the decoded PACS domains against the per-image path."""
import math

import pytest
import torch

from gaqat_kernels.data.device_augment import (DeviceAugment, _hsv_to_rgb, _rgb_to_hsv, apply_augment,
                                               decode_domains, normalize, sample_params)


def identity_params(n, height, width, **overrides):
    p = {"x0": torch.zeros(n, dtype=torch.float64), "y0": torch.zeros(n, dtype=torch.float64),
         "cw": torch.full((n,), float(width), dtype=torch.float64),
         "ch": torch.full((n,), float(height), dtype=torch.float64), "flip": torch.zeros(n, dtype=torch.bool),
         "brightness": torch.ones(n), "contrast": torch.ones(n), "saturation": torch.ones(n), "hue": torch.zeros(n),
         "order": torch.arange(4).repeat(n, 1), "gray": torch.zeros(n, dtype=torch.bool)}
    p.update(overrides)
    return p


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.randint(0, 256, (5, 3, 12, 16), dtype=torch.uint8)


def test_identity_choices_only_normalise(images):
    sq = images[..., :12]
    out = apply_augment(sq, identity_params(5, 12, 12), size=12)
    torch.testing.assert_close(out, normalize(sq), rtol=0, atol=1e-5)  # float32 grid and HSV round trip: far below 1/255


def test_crop_and_flip_land_on_pixel_centres(images):
    p = identity_params(5, 12, 16, x0=torch.full((5,), 3.0, dtype=torch.float64),
                        y0=torch.full((5,), 2.0, dtype=torch.float64), cw=torch.full((5,), 8.0, dtype=torch.float64),
                        ch=torch.full((5,), 8.0, dtype=torch.float64), flip=torch.tensor([True, False] * 2 + [True]))
    out = apply_augment(images, p, size=8)
    crop = images[:, :, 2:10, 3:11]
    expected = torch.where(p["flip"].view(-1, 1, 1, 1), crop.flip(-1), crop)
    torch.testing.assert_close(out, normalize(expected), rtol=0, atol=1e-5)  # float32 grid and HSV round trip: far below 1/255


def test_hsv_round_trip_and_hue_rotation():
    torch.manual_seed(1)
    x = torch.rand(4, 3, 6, 6)
    torch.testing.assert_close(_hsv_to_rgb(_rgb_to_hsv(x)), x, rtol=0, atol=1e-5)
    red = torch.zeros(1, 3, 1, 1)
    red[:, 0] = 1
    p = identity_params(1, 1, 1, hue=torch.tensor([1 / 3]), order=torch.tensor([[3, 0, 1, 2]]))
    green = apply_augment((red * 255).to(torch.uint8), p, size=1)
    torch.testing.assert_close(green, normalize(torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)), rtol=0, atol=1e-5)


def test_jitter_factors_and_grayscale(images):
    sq = images[..., :12]
    x = sq.float() / 255
    p = identity_params(5, 12, 12, brightness=torch.full((5,), 1.2), order=torch.tensor([[0, 1, 2, 3]] * 5))
    torch.testing.assert_close(apply_augment(sq, p, 12), normalize((x * 1.2).clamp(0, 1)), rtol=0, atol=1e-5)
    gray = identity_params(5, 12, 12, gray=torch.ones(5, dtype=torch.bool))
    out = apply_augment(sq, gray, 12) * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) \
        + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # undo the normalisation
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)
    # saturation 0 is grayscale too; contrast 0 is the image's mean gray everywhere
    zero = torch.zeros(5)
    desat = apply_augment(sq, identity_params(5, 12, 12, saturation=zero), 12)
    torch.testing.assert_close(desat, apply_augment(sq, gray, 12), rtol=0, atol=1e-5)
    flat = apply_augment(sq, identity_params(5, 12, 12, contrast=zero), 12)
    assert torch.allclose(flat, flat[..., :1, :1].expand_as(flat), atol=1e-5)


def test_bad_input_is_named(images):
    with pytest.raises(ValueError, match="x: expected uint8 images"):
        apply_augment(images.float() / 255, identity_params(5, 12, 16), 8)
    with pytest.raises(ValueError, match=r"x: expected uint8 images of shape \(B, 3, H, W\)"):
        apply_augment(images[:, :1], identity_params(5, 12, 16), 8)


def test_random_choices_follow_domainbed_ranges():
    g = torch.Generator().manual_seed(0)
    p = sample_params(4000, 30, 40, g)
    area = p["cw"] * p["ch"] / (30 * 40)
    assert bool(((p["x0"] >= 0) & (p["x0"] + p["cw"] <= 40) & (p["y0"] >= 0) & (p["y0"] + p["ch"] <= 30)).all())
    assert area.min() > 0.66 and area.max() <= 1.0  # scale (0.7, 1) after rounding the sides
    ratio = p["cw"] / p["ch"]
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    assert abs(p["flip"].double().mean().item() - 0.5) < 0.03 and abs(p["gray"].double().mean().item() - 0.1) < 0.02
    for k in ("brightness", "contrast", "saturation"):
        assert 0.7 <= p[k].min() and p[k].max() <= 1.3
    assert -0.3 <= p["hue"].min() and p["hue"].max() <= 0.3
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(4000, 4))
    again = sample_params(4000, 30, 40, torch.Generator().manual_seed(0))
    assert all(torch.equal(p[k], again[k]) for k in p)


def test_ranks_take_their_share_of_one_global_draw(images):
    augment = DeviceAugment(8)
    whole = augment(torch.cat([images, images]), torch.Generator().manual_seed(3))
    shares = [augment(images, torch.Generator().manual_seed(3), rank, 2) for rank in (0, 1)]
    torch.testing.assert_close(torch.cat(shares), whole, rtol=0, atol=0)


def test_decoded_pacs_evaluates_like_the_file_path():
    from test_data import shared

    from gaqat_kernels.data import get_dataset
    from gaqat_kernels.data.base import TensorDomain

    root = shared("pacs128")
    files = get_dataset("PACS", root, image_size=64)
    files.domains = [d.head(6) for d in files.domains]
    decoded = decode_domains(files)
    for f, d in zip(files.domains, decoded.domains):
        assert isinstance(d, TensorDomain) and d.x.dtype == torch.uint8 and d.x.shape == (6, 3, 64, 64)
        expected = torch.stack([f[i][0] for i in range(len(f))])
        torch.testing.assert_close(d.model_input(d.x), expected, rtol=0, atol=1e-6)
        assert d.y.tolist() == f.labels
        out = d.train_transform(d.x, torch.Generator().manual_seed(0))
        assert out.shape == (6, 3, 64, 64) and out.dtype == torch.float32 and math.isfinite(out.abs().max().item())
