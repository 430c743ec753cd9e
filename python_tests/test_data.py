"""Multi-domain datasets: DomainBed's MNIST recipes on real MNIST, PACS from its zips and from an ImageFolder
layout, the digits default, and clear errors for missing or malformed roots. Dataset tests skip when
../shared/data is absent."""
import gzip
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gaqat_kernels.data import colored_mnist, get_dataset, image_folder_dataset, load_mnist, rotated_digits, rotated_mnist

REPO = Path(__file__).resolve().parents[1]


def shared(name):
    for root in (REPO.parent / "shared" / "data" / name, REPO / ".data" / name):
        if root.exists():
            return str(root)
    pytest.skip(f"{name} not found in ../shared/data or .data")


def test_mnist_idx_files():
    images, labels = load_mnist(shared("mnist"))
    assert images.shape == (70000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (70000,) and set(labels.tolist()) == set(range(10))
    assert int(images.max()) == 255 and int(images.min()) == 0


def test_rotated_mnist_recipe():
    root = shared("mnist")
    data = rotated_mnist(root, seed=0)
    assert data.domain_names == ["0", "15", "30", "45", "60", "75"] and data.num_classes == 10
    assert [len(d) for d in data.domains] == [11667, 11667, 11667, 11667, 11666, 11666]
    images, labels = load_mnist(root)
    order = torch.randperm(70000, generator=torch.Generator().manual_seed(0))
    # domain 0 is unrotated: exactly the shuffled images [0::6] / 255
    torch.testing.assert_close(data.domains[0].x[:, 0], images[order][0::6].float() / 255)
    assert torch.equal(data.domains[3].y, labels[order][3::6])
    # a rotated domain keeps the digit's mass roughly and moves pixels
    assert not torch.equal(data.domains[3].x[:, 0], images[order][3::6].float() / 255)
    ratio = data.domains[3].x.sum() / (images[order][3::6].float() / 255).sum()
    assert 0.9 < float(ratio) < 1.05


def test_colored_mnist_recipe():
    data = colored_mnist(shared("mnist"), seed=0)
    assert data.input_shape == (2, 28, 28) and data.num_classes == 2
    for flip, d in zip((0.1, 0.2, 0.9), data.domains):
        red = d.x[:, 0].flatten(1).sum(1) > 0
        green = d.x[:, 1].flatten(1).sum(1) > 0
        assert not bool((red & green).any())  # one colour channel per image
        colour = green.long()  # channel 1 is kept when colour == 1
        mismatch = float((colour != d.y).float().mean())
        assert abs(mismatch - flip) < 0.02, (flip, mismatch)


def test_digits_default():
    data = rotated_digits(seed=0)
    assert [len(d) for d in data.domains] == [599, 599, 599] and data.input_shape == (1, 8, 8)
    a, b = data.split(0, 0.2, seed=0)
    assert len(b) == int(599 * 0.2) and len(a) + len(b) == 599


def test_pacs_from_zips():
    data = get_dataset("PACS", shared("pacs128"), image_size=64)
    assert data.domain_names == ["art_painting", "cartoon", "photo", "sketch"] and data.num_classes == 7
    assert [len(d) for d in data.domains] == [2048, 2344, 1670, 3929]
    train, val = data.split(2, 0.2, seed=0)
    x, y = train[0]
    assert x.shape == (3, 64, 64) and 0 <= y < 7
    xv, _ = val[0]
    assert xv.shape == (3, 64, 64)
    assert not torch.equal(val[0][0], train[0][0])


def test_image_folder_layout(tmp_path):
    src = Path(shared("pacs128"))
    for domain in ("art_painting", "cartoon", "photo", "sketch"):  # a few real images per class
        with zipfile.ZipFile(src / f"{domain}.zip") as z:
            names = [n for n in z.namelist() if n.endswith(".jpg")]
            per_class = {}
            for n in names:
                per_class.setdefault(n.split("/")[-2], []).append(n)
            for n in [m for members in per_class.values() for m in members[:2]]:
                parts = n.split("/")
                target = tmp_path / domain / parts[-2] / parts[-1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(n))
    data = image_folder_dataset("PACS", str(tmp_path), image_size=32)
    assert len(data.domains) == 4 and data.num_classes == 7 and data.domains[0][0][0].shape == (3, 32, 32)
    assert [len(d) for d in data.domains] == [14, 14, 14, 14]
    (tmp_path / "sketch" / "dog" / "extra").mkdir()
    shutil.rmtree(tmp_path / "sketch" / "horse")
    with pytest.raises(FileNotFoundError, match="has classes"):
        image_folder_dataset("PACS", str(tmp_path))


def test_missing_or_malformed_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="<domain>/<class>"):
        get_dataset("PACS", str(tmp_path / "nowhere"))
    (tmp_path / "art_painting").mkdir()
    with pytest.raises(FileNotFoundError, match="missing domains"):
        get_dataset("PACS", str(tmp_path))
    bad = tmp_path / "mnist"
    bad.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(bad / (name + ".gz"), "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + bytes(10))  # says 100 values, has 10
    with pytest.raises(ValueError, match="truncated"):
        load_mnist(str(bad))
    with pytest.raises(ValueError, match="dataset"):
        get_dataset("CIFAR", None)
    data = rotated_digits()
    with pytest.raises(ValueError, match="test domain"):
        data.domain_index("90")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_copies_without_aliasing_the_source():
    """The non-blocking GPU copy goes through its own pinned buffer: changing the source right after the call
    (as the next step's draws do) cannot change what arrives, even behind queued GPU work."""
    from gaqat_kernels.data import to_device

    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        busy = busy @ busy / 4096  # keep the stream busy so that the copy is still queued below
    source = torch.randint(0, 1000, (4096,))
    expected = source.clone()
    copied = to_device(source, "cuda")
    source.zero_()
    assert copied.is_cuda and torch.equal(copied.cpu(), expected)
